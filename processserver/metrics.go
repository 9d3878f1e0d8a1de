package processserver

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/lifeboat-dr/lifeboat/internal/pki"
)

// metrics are the process server's Prometheus metrics.
type metrics struct {
	receivedBytes prometheus.Counter
	uploadedBytes prometheus.Counter
	cacheBytes    prometheus.Gauge
	freeRatio     prometheus.Gauge
	rebuiltShards prometheus.Counter
	certExpiry    prometheus.Collector
	machines      machineCollector
}

func newMetrics(s *Server, reg prometheus.Registerer) *metrics {
	m := &metrics{
		machines: machineCollector{s},
		receivedBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "lifeboat_ps_received_bytes_total",
			Help: "Bytes of batch, marker and control frames received from agents.",
		}),
		uploadedBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "lifeboat_ps_uploaded_bytes_total",
			Help: "Bytes of sealed (compressed, encrypted) journal segments uploaded to the storage account.",
		}),
		cacheBytes: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "lifeboat_ps_cache_bytes",
			Help: "Bytes of segments held in the cache (before erasure coding): not yet uploaded or not yet applied.",
		}),
		freeRatio: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "lifeboat_ps_cache_free_ratio",
			Help: "Free fraction of the fullest cache file system; warnings below 0.30, errors below 0.25, agents paused below 0.10.",
		}),
		rebuiltShards: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "lifeboat_ps_cache_rebuilt_shards_total",
			Help: "Cache shards rebuilt from the other directories after a cache directory was wiped or replaced.",
		}),
		certExpiry: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: pki.ExpiryMetric,
			Help: pki.ExpiryMetricHelp,
		}, func() float64 {
			if s.id == nil {
				return 0
			}
			return float64(s.id.NotAfter().Unix())
		}),
	}
	if reg != nil {
		m.register(reg)
	}
	return m
}

func (m *metrics) register(reg prometheus.Registerer) {
	reg.MustRegister(m.receivedBytes, m.uploadedBytes, m.cacheBytes, m.freeRatio, m.rebuiltShards, m.certExpiry, m.machines)
}

// The per-machine metrics, computed at scrape time from what the server
// knows of each machine's manifest in the account: RPO keeps growing
// while nothing reaches the account, whatever else is stuck.
var (
	rpoDesc = prometheus.NewDesc("lifeboat_rpo_seconds",
		"Now minus recoverable_until (the time before which every write of the machine is in the storage account): how much recent history a disaster would lose. Absent until the machine first has one.",
		[]string{"machine"}, nil)
	recoverableDesc = prometheus.NewDesc("lifeboat_ps_recoverable",
		"1 once the machine has a recoverable_until (a state the account can recover), 0 before: its first sync, or its manifest not read yet and no earlier value known.",
		[]string{"machine"}, nil)
	durableSeqDesc = prometheus.NewDesc("lifeboat_ps_durable_seq",
		"Highest sequence number of the machine whose records are all in the storage account's journal, as its manifest there says.",
		[]string{"machine"}, nil)
	machineCacheDesc = prometheus.NewDesc("lifeboat_ps_machine_cache_bytes",
		"Bytes of the machine's journal in this server's cache waiting for their upload or for the applier (what --machine-cache-limit bounds): which machine fills the cache.",
		[]string{"machine"}, nil)
	appliedSeqDesc = prometheus.NewDesc("lifeboat_ps_applied_seq",
		"Highest sequence number of the machine applied to its replicas by this server's applier (0 before it reports); durable_seq minus it is the replica's lag in records.",
		[]string{"machine"}, nil)
)

// machineCollector reports every machine this server serves; one another
// process server took over (fenced) is not reported.
type machineCollector struct{ s *Server }

func (c machineCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- rpoDesc
	ch <- recoverableDesc
	ch <- durableSeqDesc
	ch <- machineCacheDesc
	ch <- appliedSeqDesc
}

func (c machineCollector) Collect(ch chan<- prometheus.Metric) {
	now := time.Now()
	for _, m := range c.s.machineList() {
		r, ok := m.report()
		if !ok {
			continue
		}
		recoverable := 0.0
		if !r.until.IsZero() {
			recoverable = 1
			ch <- prometheus.MustNewConstMetric(rpoDesc, prometheus.GaugeValue, max(now.Sub(r.until).Seconds(), 0), m.name)
		}
		ch <- prometheus.MustNewConstMetric(recoverableDesc, prometheus.GaugeValue, recoverable, m.name)
		if r.loaded {
			ch <- prometheus.MustNewConstMetric(durableSeqDesc, prometheus.GaugeValue, float64(r.durable), m.name)
		}
		ch <- prometheus.MustNewConstMetric(machineCacheDesc, prometheus.GaugeValue, float64(m.cacheShare()), m.name)
		ch <- prometheus.MustNewConstMetric(appliedSeqDesc, prometheus.GaugeValue, float64(m.appliedSeq()), m.name)
	}
}
