package processserver

import "github.com/prometheus/client_golang/prometheus"

// metrics are the process server's Prometheus metrics.
type metrics struct {
	receivedBytes prometheus.Counter
	uploadedBytes prometheus.Counter
	cacheBytes    prometheus.Gauge
	freeRatio     prometheus.Gauge
	rebuiltShards prometheus.Counter
	durableSeq    *prometheus.GaugeVec
	rpo           *prometheus.GaugeVec
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
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
		durableSeq: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "lifeboat_ps_durable_seq",
			Help: "Highest sequence number of the machine whose records are all in the storage account's journal.",
		}, []string{"machine"}),
		rpo: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "lifeboat_rpo_seconds",
			Help: "Now minus recoverable_until: how much recent history a disaster would lose.",
		}, []string{"machine"}),
	}
	if reg != nil {
		m.register(reg)
	}
	return m
}

func (m *metrics) register(reg prometheus.Registerer) {
	reg.MustRegister(m.receivedBytes, m.uploadedBytes, m.cacheBytes, m.freeRatio, m.rebuiltShards, m.durableSeq, m.rpo)
}
