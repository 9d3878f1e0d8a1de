package perf

import (
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/lifeboat-dr/lifeboat/agent"
)

// CaptureReport is the outcome of RunCapture. Units: MB and GB are decimal
// (1e6, 1e9 bytes); latencies are microseconds; CPU percentages are of one
// core.
type CaptureReport struct {
	Started    time.Time       `json:"started"`
	Kernel     string          `json:"kernel"`
	FioVersion string          `json:"fio_version"`
	Settings   CaptureSettings `json:"settings"`
	// OtherCaptures counts capture instances other agents had pinned on
	// bpffs when the run started: their programs run on every bio too,
	// so the run's figures include their cost.
	OtherCaptures int `json:"other_captures"`
	// BPFStats is kernel.bpf_stats_enabled: when set, the kernel times
	// every BPF program run, which adds to every captured write.
	BPFStats bool `json:"bpf_stats_enabled"`
	// Results has one entry per workload × variant, in configuration
	// order.
	Results []CaptureResult `json:"results"`
	// Samples has every individual run in execution order.
	Samples []CaptureSample `json:"samples"`
	// Goals are the capture goals as this run judged them.
	Goals []Goal `json:"goals"`
}

// The capture goals.
const (
	GoalMetadataIOPSRatio = 0.95 // metadata mode ÷ no capture, IOPS
	GoalDataIOPSRatio     = 0.85 // data mode ÷ no capture, IOPS
	GoalAgentRSSMiB       = 64   // agent peak RSS besides the ring
)

// captureGoals judges the goals on results: the IOPS ratios on the
// workloads run as fast as they go, no overflow in data mode on those
// capped at OverflowRate or below (not measured when fio fell short of
// 90 % of the cap without overflowing), and the agent's peak RSS.
func captureGoals(workloads []Workload, results []CaptureResult) []Goal {
	find := func(wl string, v Variant) *CaptureResult {
		for i := range results {
			if results[i].Workload == wl && results[i].Variant == v {
				return &results[i]
			}
		}
		return nil
	}
	judge := func(v *float64, ok func(float64) bool) *bool {
		if v == nil {
			return nil
		}
		b := ok(*v)
		return &b
	}
	var goals []Goal
	for _, wl := range workloads {
		if wl.Rate != 0 {
			continue
		}
		for _, g := range []struct {
			v    Variant
			goal float64
		}{{VariantMetadata, GoalMetadataIOPSRatio}, {VariantData, GoalDataIOPSRatio}} {
			var ratio *float64
			if r := find(wl.Name, g.v); r != nil {
				ratio = r.IOPSRatio
			}
			goals = append(goals, Goal{
				Goal:  fmt.Sprintf("%s mode ≥ %.0f%% of no-capture IOPS, %s", g.v, 100*g.goal, wl.Name),
				Value: ratio, Unit: "× none",
				Met: judge(ratio, func(x float64) bool { return x >= g.goal }),
			})
		}
	}
	for _, wl := range workloads {
		if wl.Rate == 0 || wl.Rate > OverflowRate {
			continue
		}
		g := Goal{Goal: fmt.Sprintf("no overflow in data mode at %.0f MB/s, %s", float64(wl.Rate)/1e6, wl.Name), Unit: "overflows"}
		if r := find(wl.Name, VariantData); r != nil && r.OverflowEvents != nil {
			n := float64(*r.OverflowEvents)
			g.Value = &n
			switch {
			case n > 0:
				g.Met = new(bool)
			case r.MBPerSec >= 0.9*float64(wl.Rate)/1e6:
				ok := true
				g.Met = &ok
			}
		}
		goals = append(goals, g)
	}
	var rss *int64
	for _, r := range results {
		rss = maxPtr(rss, r.AgentPeakRSSBytes)
	}
	g := Goal{Goal: fmt.Sprintf("agent RSS besides the ring < %d MiB", GoalAgentRSSMiB), Unit: "MiB"}
	if rss != nil {
		mib := float64(*rss) / (1 << 20)
		g.Value, g.Met = &mib, judge(&mib, func(x float64) bool { return x < GoalAgentRSSMiB })
	}
	return append(goals, g)
}

// CaptureSettings records the effective configuration of a run.
type CaptureSettings struct {
	RuntimeSeconds  float64    `json:"runtime_seconds"`
	Rounds          int        `json:"rounds"`
	DeviceSizeBytes int64      `json:"device_size_bytes"`
	IOEngine        string     `json:"ioengine"`
	Variants        []Variant  `json:"variants"`
	Workloads       []Workload `json:"workloads"`
	AgentExe        string     `json:"agent_exe,omitempty"`
	RingMiB         int        `json:"ring_mib,omitempty"`
	ReadbackDelay   string     `json:"readback_delay,omitempty"` // metadata-mode agents
	// AgentCgroup is the block I/O cgroup the agents ran in, "" when
	// they shared the harness's (and fio's).
	AgentCgroup string `json:"agent_cgroup,omitempty"`
}

// CaptureSample is one fio run under one variant. Agent fields are nil for
// VariantNone; OverflowEvents and Records are nil when the agent did not
// report them. Agent CPU covers only the fio run; peak RSS (VmHWM) is read
// after it and so includes the initial sync.
type CaptureSample struct {
	Round    int     `json:"round"` // 1-based
	Workload string  `json:"workload"`
	Variant  Variant `json:"variant"`

	IOPS             float64 `json:"iops"`
	BWBytes          float64 `json:"bw_bytes_per_sec"`
	P99WriteUs       float64 `json:"p99_write_us"`
	BytesWritten     int64   `json:"bytes_written"`
	WallSeconds      float64 `json:"wall_seconds"` // fio process lifetime, the agent CPU window
	FioUsrCPUPercent float64 `json:"fio_usr_cpu_percent"`
	// FioSysCPUPercent includes in-kernel capture cost charged to the
	// writer (BPF programs run in its context).
	FioSysCPUPercent float64 `json:"fio_sys_cpu_percent"`

	AgentCPUSeconds      *float64       `json:"agent_cpu_seconds,omitempty"`
	AgentCPUSecondsPerGB *float64       `json:"agent_cpu_seconds_per_gb,omitempty"`
	AgentCPUPercent      *float64       `json:"agent_cpu_percent,omitempty"`
	AgentPeakRSSBytes    *int64         `json:"agent_peak_rss_bytes,omitempty"`
	OverflowEvents       *int64         `json:"overflow_events,omitempty"`
	Records              *int64         `json:"records,omitempty"`
	AgentCounters        map[string]any `json:"agent_counters,omitempty"`
}

// CaptureResult aggregates the rounds of one workload × variant. Rates and
// latency are medians over rounds. Ratios are the median over rounds of
// this variant's value divided by VariantNone's value in the same round
// (pairing within a round cancels drift); they are nil when VariantNone was
// not run. Peak RSS is the maximum over rounds; counters are summed.
type CaptureResult struct {
	Workload string  `json:"workload"`
	Variant  Variant `json:"variant"`
	Rounds   int     `json:"rounds"`

	IOPS       float64 `json:"iops"`
	MBPerSec   float64 `json:"mb_per_sec"`
	P99WriteUs float64 `json:"p99_write_us"`

	AgentCPUSecondsPerGB *float64 `json:"agent_cpu_seconds_per_gb,omitempty"`
	AgentCPUPercent      *float64 `json:"agent_cpu_percent,omitempty"`
	AgentPeakRSSBytes    *int64   `json:"agent_peak_rss_bytes,omitempty"`

	IOPSRatio       *float64 `json:"iops_ratio,omitempty"`
	MBPerSecRatio   *float64 `json:"mb_per_sec_ratio,omitempty"`
	P99WriteUsRatio *float64 `json:"p99_write_us_ratio,omitempty"`

	OverflowEvents *int64 `json:"overflow_events,omitempty"`
	Records        *int64 `json:"records,omitempty"`
}

// summary is the one-line progress report of a sample.
func (s CaptureSample) summary() string {
	out := fmt.Sprintf("%.0f IOPS, %.1f MB/s, p99 %.0f µs", s.IOPS, s.BWBytes/1e6, s.P99WriteUs)
	if s.AgentCPUPercent != nil {
		out += fmt.Sprintf(", agent %.1f%% CPU, %.2f s/GB", *s.AgentCPUPercent, *s.AgentCPUSecondsPerGB)
	}
	if s.OverflowEvents != nil && *s.OverflowEvents > 0 {
		out += fmt.Sprintf(", %d OVERFLOWS", *s.OverflowEvents)
	}
	return out
}

// summarize aggregates samples into one CaptureResult per workload ×
// variant, in the given order. Combinations without samples are omitted.
func summarize(workloads []Workload, variants []Variant, samples []CaptureSample) []CaptureResult {
	type key struct {
		wl    string
		v     Variant
		round int
	}
	byKey := make(map[key]CaptureSample, len(samples))
	for _, s := range samples {
		byKey[key{s.Workload, s.Variant, s.Round}] = s
	}
	var results []CaptureResult
	for _, wl := range workloads {
		for _, v := range variants {
			var iops, mbps, p99, cpuGB, cpuPct, rIOPS, rMBps, rP99 []float64
			var rss, overflow, records *int64
			r := CaptureResult{Workload: wl.Name, Variant: v}
			for _, s := range samples {
				if s.Workload != wl.Name || s.Variant != v {
					continue
				}
				r.Rounds++
				iops = append(iops, s.IOPS)
				mbps = append(mbps, s.BWBytes/1e6)
				p99 = append(p99, s.P99WriteUs)
				if s.AgentCPUSecondsPerGB != nil {
					cpuGB = append(cpuGB, *s.AgentCPUSecondsPerGB)
				}
				if s.AgentCPUPercent != nil {
					cpuPct = append(cpuPct, *s.AgentCPUPercent)
				}
				rss = maxPtr(rss, s.AgentPeakRSSBytes)
				overflow = sumPtr(overflow, s.OverflowEvents)
				records = sumPtr(records, s.Records)
				if base, ok := byKey[key{wl.Name, VariantNone, s.Round}]; ok {
					rIOPS = appendRatio(rIOPS, s.IOPS, base.IOPS)
					rMBps = appendRatio(rMBps, s.BWBytes, base.BWBytes)
					rP99 = appendRatio(rP99, s.P99WriteUs, base.P99WriteUs)
				}
			}
			if r.Rounds == 0 {
				continue
			}
			r.IOPS = median(iops)
			r.MBPerSec = median(mbps)
			r.P99WriteUs = median(p99)
			r.AgentCPUSecondsPerGB = medianPtr(cpuGB)
			r.AgentCPUPercent = medianPtr(cpuPct)
			r.AgentPeakRSSBytes = rss
			r.IOPSRatio = medianPtr(rIOPS)
			r.MBPerSecRatio = medianPtr(rMBps)
			r.P99WriteUsRatio = medianPtr(rP99)
			r.OverflowEvents = overflow
			r.Records = records
			results = append(results, r)
		}
	}
	return results
}

// median returns the median of xs (mean of the middle two for even
// lengths), or 0 for none. xs is not modified.
func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	m := len(s) / 2
	if len(s)%2 == 1 {
		return s[m]
	}
	return (s[m-1] + s[m]) / 2
}

func medianPtr(xs []float64) *float64 {
	if len(xs) == 0 {
		return nil
	}
	m := median(xs)
	return &m
}

// appendRatio appends v/base, skipping a zero base (no meaningful ratio).
func appendRatio(rs []float64, v, base float64) []float64 {
	if base == 0 {
		return rs
	}
	return append(rs, v/base)
}

func maxPtr(acc, v *int64) *int64 {
	if v == nil {
		return acc
	}
	if acc == nil || *v > *acc {
		x := *v
		return &x
	}
	return acc
}

func sumPtr(acc, v *int64) *int64 {
	if v == nil {
		return acc
	}
	x := *v
	if acc != nil {
		x += *acc
	}
	return &x
}

// WriteJSON writes the report as indented JSON.
func (r *CaptureReport) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(r); err != nil {
		return fmt.Errorf("write capture report JSON: %w", err)
	}
	return nil
}

// WriteTable writes the results as an aligned text table preceded by a
// line describing the run. "-" marks values that do not apply (no agent,
// no baseline, counter not reported).
func (r *CaptureReport) WriteTable(w io.Writer) error {
	st := r.Settings
	if _, err := fmt.Fprintf(w, "%s, %s, kernel %s, device %d MiB, %d round(s) × %gs; medians over rounds, ×none = median per-round ratio to no capture\n",
		r.FioVersion, st.IOEngine, r.Kernel, st.DeviceSizeBytes>>20, st.Rounds, st.RuntimeSeconds); err != nil {
		return err
	}
	if st.AgentCgroup != "" {
		fmt.Fprintf(w, "agents ran in their own block I/O cgroup %s, as a service does (--shared-cgroup: in fio's)\n", st.AgentCgroup)
	} else if slices.ContainsFunc(st.Variants, func(v Variant) bool { return v != VariantNone }) {
		fmt.Fprintln(w, "agents ran in fio's block I/O cgroup (--shared-cgroup)")
	}
	if st.ReadbackDelay != "" && st.ReadbackDelay != "0s" {
		fmt.Fprintf(w, "metadata-mode agents read back after %s (--readback-delay)\n", st.ReadbackDelay)
	}
	if r.BPFStats {
		fmt.Fprintln(w, "WARNING: kernel.bpf_stats_enabled=1: the kernel times every BPF program run, which every captured write pays for (sysctl -w kernel.bpf_stats_enabled=0)")
	}
	if r.OtherCaptures > 0 {
		fmt.Fprintf(w, "WARNING: %d other capture instance(s) were attached (pinned under %s): every variant paid for them\n", r.OtherCaptures, agent.PinRoot)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "workload\tvariant\tIOPS\tMB/s\tp99 µs\tCPU s/GB\tCPU %\tRSS MiB*\tIOPS ×none\tMB/s ×none\tp99 ×none\toverflows\t")
	for _, x := range r.Results {
		fmt.Fprintf(tw, "%s\t%s\t%.0f\t%.1f\t%.0f\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t\n",
			x.Workload, x.Variant, x.IOPS, x.MBPerSec, x.P99WriteUs,
			fmtFloat(x.AgentCPUSecondsPerGB, 3), fmtFloat(x.AgentCPUPercent, 1), fmtMiB(x.AgentPeakRSSBytes),
			fmtFloat(x.IOPSRatio, 3), fmtFloat(x.MBPerSecRatio, 3), fmtFloat(x.P99WriteUsRatio, 3),
			fmtInt(x.OverflowEvents))
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write capture report table: %w", err)
	}
	if _, err := fmt.Fprintln(w, "* agent peak RSS less its ring buffer's mapping (mapped twice and always resident); its other BPF maps count"); err != nil {
		return err
	}
	return writeGoals(w, r.Goals)
}

func fmtFloat(p *float64, prec int) string {
	if p == nil {
		return "-"
	}
	return strconv.FormatFloat(*p, 'f', prec, 64)
}

func fmtMiB(p *int64) string {
	if p == nil {
		return "-"
	}
	return strconv.FormatFloat(float64(*p)/(1<<20), 'f', 1, 64)
}

func fmtInt(p *int64) string {
	if p == nil {
		return "-"
	}
	return strconv.FormatInt(*p, 10)
}
