package perf

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/stage"
)

// Goals of the pipeline benchmark (issue 3).
const (
	GoalRPOSeconds       = 2.0 // RPO p99 at ASRChurnLimit and at half the ceiling
	GoalSustainedRatio   = 0.8 // highest sustained churn ÷ ceiling
	GoalPSCPUSecondsPerG = 1.0 // process server CPU seconds per GB received
)

// Sustained-churn judgement of a level.
const (
	// minChurnRatio: fio must reach this fraction of the requested rate,
	// or the level measured the load generator, not the pipeline.
	minChurnRatio = 0.9
	// maxGrowthRate and minGrowth: RPO (or apply lag) growing by more
	// than maxGrowthRate seconds per second, and by at least minGrowth
	// (sampling noise), between the window's first and last quarter means
	// the backlog grows without bound: the pipeline moves less than ~97%
	// of the churn. (0.1 let a replica keeping 91% of it pass.)
	maxGrowthRate = 0.03
	minGrowth     = 0.5
	// catchUpSlack: after fio, the journal (the replica) must hold
	// everything within its p99 RPO (apply lag) and this much more (one
	// marker interval and sampling): a longer catch-up is a backlog the
	// window's samples did not show as growth.
	catchUpSlack = 1.0
)

// PipelineReport is the outcome of RunPipeline. Units: MB and GB are
// decimal (1e6, 1e9 bytes); times are seconds.
type PipelineReport struct {
	// Error is why the run stopped before its end: the figures are
	// partial and no goal is judged.
	Error      string           `json:"error,omitempty"`
	Started    time.Time        `json:"started"`
	Kernel     string           `json:"kernel"`
	FioVersion string           `json:"fio_version"`
	Azurite    string           `json:"azurite"`
	Settings   PipelineSettings `json:"settings"`
	Ceiling    PipelineCeiling  `json:"ceiling"`
	// InitialSyncSeconds is from the agent's start until the replica held
	// the whole device.
	InitialSyncSeconds float64 `json:"initial_sync_seconds"`
	// Levels in execution order.
	Levels []PipelineLevel `json:"levels"`
	// Sustained has the highest sustained churn per block size.
	Sustained []SustainedChurn `json:"sustained"`
	// PSCPUSecondsPerGB is the process server's CPU time over all levels
	// per GB received; nil when nothing was received.
	PSCPUSecondsPerGB *float64 `json:"ps_cpu_seconds_per_gb,omitempty"`
	// BeforeUploadCPUSecondsPerGB is the process server's CPU in its
	// stages before upload over all levels' fio windows, per GB received.
	BeforeUploadCPUSecondsPerGB *float64 `json:"before_upload_cpu_seconds_per_gb,omitempty"`
	// BeforeUploadProratedCPUSecondsPerGB adds to it the share of the
	// unlabelled CPU (StageOther: the garbage collector, the scheduler)
	// that the stages before upload take of the labelled CPU: the goal's
	// figure is a lower bound, this an estimate of what it leaves out.
	BeforeUploadProratedCPUSecondsPerGB *float64       `json:"before_upload_prorated_cpu_seconds_per_gb,omitempty"`
	Goals                               []PipelineGoal `json:"goals"`
}

// PipelineSettings records the effective configuration of a run.
type PipelineSettings struct {
	Exe                 string    `json:"exe"`
	Dir                 string    `json:"dir"`
	DeviceSizeBytes     int64     `json:"device_size_bytes"`
	RuntimeSeconds      float64   `json:"runtime_seconds"`
	Rates               []float64 `json:"rates_bytes_per_sec,omitempty"`
	Search              bool      `json:"search"`
	BlockSizes          []int64   `json:"block_sizes"`
	IODepth             int       `json:"iodepth"`
	IOEngine            string    `json:"ioengine"`
	CompressiblePercent int       `json:"compressible_percent"`
	CeilingBytes        int64     `json:"ceiling_bytes"`
	AzuriteInMemory     bool      `json:"azurite_in_memory"`
	CacheDirs           int       `json:"cache_dirs"`
	SampleIntervalMs    int64     `json:"sample_interval_ms"`
}

// PipelineCeiling is raw 4 MiB Put Page throughput to the run's Azurite.
// MBPerSec, the best of Runs, is what every ratio divides by.
type PipelineCeiling struct {
	MBPerSec float64      `json:"mb_per_sec"`
	Runs     []CeilingRun `json:"runs"`
	// Stored is, per block size, the same bytes written the way the
	// pipeline must store them, straight to the same Azurite: once as
	// journal blobs and once as Put Pages of that block size at random
	// offsets of a page blob (the replica). No pipeline that keeps both
	// sustains more than this with that block size.
	Stored []StoredRun `json:"stored,omitempty"`
}

// StoredRun is one measurement of PipelineCeiling.Stored.
type StoredRun struct {
	BlockSize int64 `json:"block_size"`
	CeilingRun
	// CeilingRatio is MBPerSec ÷ PipelineCeiling.MBPerSec.
	CeilingRatio float64 `json:"ceiling_ratio"`
}

// CeilingRun is one ceiling measurement.
type CeilingRun struct {
	Clients  int     `json:"clients"`
	Bytes    int64   `json:"bytes"`
	Seconds  float64 `json:"seconds"`
	MBPerSec float64 `json:"mb_per_sec"`
	// AzuriteCPU is the CPU Azurite used over the run, in cores (its
	// Node.js thread serves every request: near 1 means it was the limit).
	AzuriteCPU *float64 `json:"azurite_cpu_cores,omitempty"`
}

// PipelineLevel is one fio run at a fixed churn rate and what the pipeline
// made of it. RPO samples and apply-lag samples cover the fio window; byte
// counts, CPU and catch-up times run until the replica held everything.
type PipelineLevel struct {
	Label        string  `json:"label"` // LevelASR, LevelHalfCeiling, LevelRate or LevelSearch
	BlockSize    int64   `json:"block_size"`
	RateMBPerSec float64 `json:"rate_mb_per_sec"` // requested churn

	WindowSeconds float64 `json:"window_seconds"` // fio's wall time
	BytesWritten  int64   `json:"bytes_written"`
	ChurnMBPerSec float64 `json:"churn_mb_per_sec"` // what fio achieved
	P99WriteUs    float64 `json:"p99_write_us"`

	// PipelineMBPerSec is the churn when the level was sustained; else
	// the bytes written ÷ the time from fio's start until the journal
	// held them all: the pipeline's throughput while saturated.
	PipelineMBPerSec float64 `json:"pipeline_mb_per_sec"`
	CeilingRatio     float64 `json:"ceiling_ratio"` // PipelineMBPerSec ÷ ceiling

	// RPO: time a manifest read returned minus its recoverable_until.
	RPOSamples    int     `json:"rpo_samples"`
	RPOP50Seconds float64 `json:"rpo_p50_seconds"`
	RPOP99Seconds float64 `json:"rpo_p99_seconds"`
	RPOMaxSeconds float64 `json:"rpo_max_seconds"`
	// Apply lag: from the manifest read that first showed a durable_seq to
	// the one that showed applied_seq at or past it.
	ApplyLagSamples    int     `json:"apply_lag_samples"`
	ApplyLagP50Seconds float64 `json:"apply_lag_p50_seconds"`
	ApplyLagP99Seconds float64 `json:"apply_lag_p99_seconds"`
	// Growth between the means of the window's first and last quarter
	// (after a 10% ramp): positive and large means an unbounded backlog.
	RPOGrowthSeconds      float64 `json:"rpo_growth_seconds"`
	ApplyLagGrowthSeconds float64 `json:"apply_lag_growth_seconds"`
	// After fio stopped: until recoverable_until passed its end, and
	// until the replica applied that journal.
	JournalCatchUpSeconds float64 `json:"journal_catch_up_seconds"`
	ReplicaCatchUpSeconds float64 `json:"replica_catch_up_seconds"`

	ReceivedBytes int64 `json:"received_bytes"` // by the process server (frames)
	SealedBytes   int64 `json:"sealed_bytes"`   // journal segment blobs of the level
	Segments      int   `json:"segments"`
	// CompressionRatio is SealedBytes ÷ ReceivedBytes (lower is better).
	CompressionRatio *float64 `json:"compression_ratio,omitempty"`

	// Process server CPU includes its applier (replica writes) and uploads.
	PSCPUSeconds      float64  `json:"ps_cpu_seconds"`
	PSCPUSecondsPerGB *float64 `json:"ps_cpu_seconds_per_gb,omitempty"` // per GB received
	// StageCPUSecondsPerGB splits the process server's CPU by stage
	// (internal/stage, from a CPU profile over the fio window) per GB
	// received in that window; BeforeUploadCPUSecondsPerGB sums the stages
	// before upload (BeforeUploadStages): the goal's measure.
	StageCPUSeconds             map[string]float64 `json:"stage_cpu_seconds,omitempty"`
	WindowReceivedBytes         int64              `json:"window_received_bytes,omitempty"`
	StageCPUSecondsPerGB        map[string]float64 `json:"stage_cpu_seconds_per_gb,omitempty"`
	BeforeUploadCPUSecondsPerGB *float64           `json:"before_upload_cpu_seconds_per_gb,omitempty"`
	AgentCPUSeconds             float64            `json:"agent_cpu_seconds"`
	AgentCPUSecondsPerGB        *float64           `json:"agent_cpu_seconds_per_gb,omitempty"` // per GB written by fio
	// AzuriteCPU is the CPU Azurite used over the fio window, in cores.
	AzuriteCPU *float64 `json:"azurite_cpu_cores,omitempty"`

	Sustained bool   `json:"sustained"`
	Reason    string `json:"reason,omitempty"` // why not sustained
}

// SustainedChurn is the highest churn sustained with one block size.
type SustainedChurn struct {
	BlockSize    int64   `json:"block_size"`
	MBPerSec     float64 `json:"mb_per_sec"`    // 0: no level was sustained
	CeilingRatio float64 `json:"ceiling_ratio"` // MBPerSec ÷ ceiling
	// LowerBound: the highest rate tried was sustained (search off, cut
	// short or capped at twice the ceiling), so the pipeline may sustain
	// more.
	LowerBound bool `json:"lower_bound"`
}

// PipelineGoal is one goal and the run's value for it; Value and Met are
// nil when the run did not measure it (e.g. explicit rates).
type PipelineGoal = Goal

// Goal is one of a benchmark's goals as this run judged it: Value and Met
// are nil when the run did not measure it.
type Goal struct {
	Goal  string   `json:"goal"`
	Value *float64 `json:"value,omitempty"`
	Unit  string   `json:"unit"`
	Met   *bool    `json:"met,omitempty"`
}

// writeGoals writes goals under a "goals:" line, one per line, aligned.
func writeGoals(w io.Writer, goals []Goal) error {
	fmt.Fprintln(w, "goals:")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, g := range goals {
		val, met := "-", "not measured"
		if g.Value != nil {
			val = strconv.FormatFloat(*g.Value, 'f', 2, 64) + " " + g.Unit
		}
		if g.Met != nil {
			met = "met"
			if !*g.Met {
				met = "NOT met"
			}
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\n", g.Goal, val, met)
	}
	return tw.Flush()
}

// timed is a value observed at a time.
type timed struct {
	t time.Time
	v float64
}

// evaluateLevel fills in l's derived figures from the manifest samples
// taken from the level's start until the replica caught up. Fio's window
// is [start, end]; durableAt is when the journal held all of it, and
// appliedAt when the replica did (l's catch-up fields say the same).
func evaluateLevel(l *PipelineLevel, samples []manifestSample, start, end, durableAt, appliedAt time.Time, ceilingBps float64) {
	var rpo []timed
	for _, s := range samples {
		if s.RecoverableUntil.IsZero() || s.At.Before(start) || s.At.After(end) {
			continue
		}
		rpo = append(rpo, timed{s.At, s.At.Sub(s.RecoverableUntil).Seconds()})
	}
	var lags []timed
	for _, x := range applyLags(samples) {
		if !x.t.Before(start) && !x.t.After(end) {
			lags = append(lags, x)
		}
	}
	rv, lv := values(rpo), values(lags)
	l.RPOSamples, l.ApplyLagSamples = len(rv), len(lv)
	l.RPOP50Seconds, l.RPOP99Seconds = percentile(rv, 50), percentile(rv, 99)
	l.RPOMaxSeconds = percentile(rv, 100)
	l.ApplyLagP50Seconds, l.ApplyLagP99Seconds = percentile(lv, 50), percentile(lv, 99)
	rpoGrowth, rpoSpan, rpoOK := growth(rpo, start, end)
	lagGrowth, lagSpan, lagOK := growth(lags, start, end)
	l.RPOGrowthSeconds, l.ApplyLagGrowthSeconds = rpoGrowth, lagGrowth

	l.Sustained, l.Reason = true, ""
	switch {
	case len(rv) == 0:
		l.Sustained, l.Reason = false, "no RPO sample in the window"
	case l.ChurnMBPerSec < minChurnRatio*l.RateMBPerSec:
		l.Sustained, l.Reason = false, fmt.Sprintf("fio reached only %.0f%% of the rate", 100*l.ChurnMBPerSec/l.RateMBPerSec)
	case rpoOK && growing(rpoGrowth, rpoSpan):
		l.Sustained, l.Reason = false, fmt.Sprintf("RPO grew %.1f s in %.0f s", rpoGrowth, rpoSpan)
	case lagOK && growing(lagGrowth, lagSpan):
		l.Sustained, l.Reason = false, fmt.Sprintf("apply lag grew %.1f s in %.0f s", lagGrowth, lagSpan)
	case l.JournalCatchUpSeconds > l.RPOP99Seconds+catchUpSlack:
		l.Sustained, l.Reason = false, fmt.Sprintf("journal caught up %.1f s after fio (RPO p99 %.1f s)", l.JournalCatchUpSeconds, l.RPOP99Seconds)
	case l.ReplicaCatchUpSeconds > l.ApplyLagP99Seconds+catchUpSlack:
		l.Sustained, l.Reason = false, fmt.Sprintf("replica caught up %.1f s after fio (apply lag p99 %.1f s)", l.ReplicaCatchUpSeconds, l.ApplyLagP99Seconds)
	}

	// Not sustained: what the whole pipeline, replica included, moved.
	if d := later(durableAt, appliedAt).Sub(start).Seconds(); !l.Sustained && d > 0 {
		l.PipelineMBPerSec = float64(l.BytesWritten) / 1e6 / d
	} else {
		l.PipelineMBPerSec = l.ChurnMBPerSec
	}
	if ceilingBps > 0 {
		l.CeilingRatio = l.PipelineMBPerSec * 1e6 / ceilingBps
	}
	if l.ReceivedBytes > 0 {
		r := float64(l.SealedBytes) / float64(l.ReceivedBytes)
		l.CompressionRatio = &r
		c := l.PSCPUSeconds / (float64(l.ReceivedBytes) / 1e9)
		l.PSCPUSecondsPerGB = &c
	}
	if l.BytesWritten > 0 {
		c := l.AgentCPUSeconds / (float64(l.BytesWritten) / 1e9)
		l.AgentCPUSecondsPerGB = &c
	}
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

func growing(delta, span float64) bool {
	return delta > max(minGrowth, maxGrowthRate*span)
}

func values(xs []timed) []float64 {
	out := make([]float64, len(xs))
	for i, x := range xs {
		out[i] = x.v
	}
	return out
}

// applyLags pairs each durable_seq the samples show with the first sample
// whose applied_seq reached it, returning the lags at the times the
// durable_seq was first seen. Both ends are quantised to the sampling
// interval, which mostly cancels out.
func applyLags(samples []manifestSample) []timed {
	if len(samples) == 0 {
		return nil
	}
	type seen struct {
		seq uint64
		at  time.Time
	}
	var pending []seen
	var out []timed
	last := samples[0].Applied
	for _, s := range samples {
		if s.Durable > last {
			pending = append(pending, seen{s.Durable, s.At})
			last = s.Durable
		}
		for len(pending) > 0 && pending[0].seq <= s.Applied {
			out = append(out, timed{pending[0].at, s.At.Sub(pending[0].at).Seconds()})
			pending = pending[1:]
		}
	}
	return out
}

// percentile returns the p-th percentile (0-100) of xs, interpolating
// linearly between closest ranks; 0 for no values. xs is not modified.
func percentile(xs []float64, p float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	r := p / 100 * float64(len(s)-1)
	lo := int(math.Floor(r))
	if lo >= len(s)-1 {
		return s[len(s)-1]
	}
	if lo < 0 {
		return s[0]
	}
	return s[lo] + (r-float64(lo))*(s[lo+1]-s[lo])
}

// growth compares the mean of xs in the last quarter of [start, end] with
// the mean in its first quarter, the first tenth skipped as ramp-up. It
// returns the difference, the time between the quarters' centres, and
// false when a quarter has no value.
func growth(xs []timed, start, end time.Time) (delta, span float64, ok bool) {
	w := end.Sub(start)
	a := start.Add(w / 10)
	q := end.Sub(a) / 4
	var first, last []float64
	for _, x := range xs {
		switch {
		case !x.t.Before(a) && x.t.Before(a.Add(q)):
			first = append(first, x.v)
		case !x.t.Before(end.Add(-q)) && !x.t.After(end):
			last = append(last, x.v)
		}
	}
	if len(first) == 0 || len(last) == 0 {
		return 0, 0, false
	}
	return mean(last) - mean(first), 3 * q.Seconds(), true
}

func mean(xs []float64) float64 {
	var s float64
	for _, x := range xs {
		s += x
	}
	return s / float64(len(xs))
}

// ratePoint is a churn rate tried with one block size.
type ratePoint struct {
	Rate      float64 // bytes/s
	Sustained bool
}

// Search steps.
const (
	searchUp         = 1.25 // × the highest sustained rate while none failed above it
	searchDown       = 0.7  // × the lowest rate while none was sustained
	searchResolution = 1.15 // stop once the failing rate is within this factor of the sustained one
	searchMinRate    = 1e6
)

// nextSearchRate returns the next rate of the search for the highest
// sustained churn, or false when the search is done: step up from the
// highest sustained rate until one fails (at most maxRate), step down
// while none is sustained, then bisect (geometrically) until the highest
// sustained and the lowest failing rate above it are within
// searchResolution.
func nextSearchRate(tried []ratePoint, maxRate float64) (float64, bool) {
	if len(tried) == 0 {
		return 0, false
	}
	pass, fail, lowest := 0.0, math.Inf(1), math.Inf(1)
	for _, t := range tried {
		lowest = min(lowest, t.Rate)
		if t.Sustained {
			pass = max(pass, t.Rate)
		}
	}
	for _, t := range tried {
		if !t.Sustained && t.Rate > pass {
			fail = min(fail, t.Rate)
		}
	}
	var next float64
	switch {
	case pass == 0:
		next = lowest * searchDown
		if next < searchMinRate {
			return 0, false
		}
		return next, true
	case math.IsInf(fail, 1):
		if pass >= maxRate {
			return 0, false
		}
		return min(pass*searchUp, maxRate), true
	case fail/pass <= searchResolution:
		return 0, false
	default:
		return math.Sqrt(pass * fail), true
	}
}

// finish computes the run-wide figures and the goals from the levels.
func (r *PipelineReport) finish() {
	r.Sustained = nil
	for _, bs := range r.Settings.BlockSizes {
		s := SustainedChurn{BlockSize: bs}
		var best, highest float64
		highestOK := false
		for _, l := range r.Levels {
			if l.BlockSize != bs {
				continue
			}
			if l.Sustained {
				best = max(best, l.ChurnMBPerSec)
			}
			if l.RateMBPerSec >= highest {
				highest, highestOK = l.RateMBPerSec, l.Sustained
			}
		}
		s.MBPerSec, s.LowerBound = best, highestOK
		if r.Ceiling.MBPerSec > 0 {
			s.CeilingRatio = best / r.Ceiling.MBPerSec
		}
		r.Sustained = append(r.Sustained, s)
	}
	var cpu float64
	var recv int64
	for _, l := range r.Levels {
		cpu += l.PSCPUSeconds
		recv += l.ReceivedBytes
	}
	r.PSCPUSecondsPerGB = nil
	if recv > 0 {
		v := cpu / (float64(recv) / 1e9)
		r.PSCPUSecondsPerGB = &v
	}
	var before, labelled, other float64
	var wrecv int64
	for _, l := range r.Levels {
		for _, k := range BeforeUploadStages {
			before += l.StageCPUSeconds[k]
		}
		for k, v := range l.StageCPUSeconds {
			if k == StageOther {
				other += v
			} else {
				labelled += v
			}
		}
		wrecv += l.WindowReceivedBytes
	}
	r.BeforeUploadCPUSecondsPerGB, r.BeforeUploadProratedCPUSecondsPerGB = nil, nil
	// Not measured (no labelled sample: a profile that failed or came
	// back empty) is not 0 s/GB.
	if wrecv > 0 && labelled > 0 {
		v := before / (float64(wrecv) / 1e9)
		p := (before + other*before/labelled) / (float64(wrecv) / 1e9)
		r.BeforeUploadCPUSecondsPerGB, r.BeforeUploadProratedCPUSecondsPerGB = &v, &p
	}

	// A level without RPO samples, or whose fio fell short of the rate,
	// measured no RPO at that churn.
	rpoAt := func(label string) *float64 {
		for _, l := range r.Levels {
			if l.Label == label && len(r.Settings.BlockSizes) > 0 && l.BlockSize == r.Settings.BlockSizes[0] {
				if l.RPOSamples == 0 || l.ChurnMBPerSec < minChurnRatio*l.RateMBPerSec {
					return nil
				}
				v := l.RPOP99Seconds
				return &v
			}
		}
		return nil
	}
	atMost := func(v *float64, lim float64) *bool {
		if v == nil {
			return nil
		}
		ok := *v <= lim
		return &ok
	}
	var ratio *float64
	if len(r.Sustained) > 0 && r.Ceiling.MBPerSec > 0 {
		ratio = &r.Sustained[0].CeilingRatio
	}
	var ratioMet *bool
	// A lower bound below the goal (the highest rate tried was
	// sustained) says nothing either way.
	if ratio != nil && (*ratio >= GoalSustainedRatio || !r.Sustained[0].LowerBound) {
		ok := *ratio >= GoalSustainedRatio
		ratioMet = &ok
	}
	asr, half := rpoAt(LevelASR), rpoAt(LevelHalfCeiling)
	r.Goals = []PipelineGoal{
		{Goal: "RPO p99 ≤ 2 s at 20 MB/s", Value: asr, Unit: "s", Met: atMost(asr, GoalRPOSeconds)},
		{Goal: "RPO p99 ≤ 2 s at half the ceiling", Value: half, Unit: "s", Met: atMost(half, GoalRPOSeconds)},
		{Goal: "sustained churn ≥ 80% of the ceiling", Value: ratio, Unit: "× ceiling", Met: ratioMet},
		{Goal: "process server ≤ 1 CPU-second per GB before upload", Value: r.BeforeUploadCPUSecondsPerGB, Unit: "s/GB", Met: atMost(r.BeforeUploadCPUSecondsPerGB, GoalPSCPUSecondsPerG)},
	}
}

// summary is the one-line progress report of a level.
func (l PipelineLevel) summary() string {
	s := fmt.Sprintf("churn %.1f MB/s, RPO p50/p99 %.2f/%.2f s, apply lag p50/p99 %.2f/%.2f s, PS %s s/GB (%s)",
		l.ChurnMBPerSec, l.RPOP50Seconds, l.RPOP99Seconds, l.ApplyLagP50Seconds, l.ApplyLagP99Seconds, fmtFloat(l.PSCPUSecondsPerGB, 2), l.stages())
	if l.Sustained {
		return s + ", sustained"
	}
	return fmt.Sprintf("%s, NOT sustained (%s; pipeline %.1f MB/s)", s, l.Reason, l.PipelineMBPerSec)
}

// WriteJSON writes the report as indented JSON.
func (r *PipelineReport) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(r); err != nil {
		return fmt.Errorf("write pipeline report JSON: %w", err)
	}
	return nil
}

// WriteTable writes the report as text: the run, the ceiling, one row per
// level, the highest sustained churn and the goals. "-" marks values that
// were not measured.
func (r *PipelineReport) WriteTable(w io.Writer) error {
	st := r.Settings
	if r.Error != "" {
		fmt.Fprintf(w, "INCOMPLETE, the run failed (%s): the figures below are partial, no goal is judged\n", r.Error)
	}
	fmt.Fprintf(w, "%s, %s, kernel %s, %d MiB loop device in %s, %gs per level, iodepth %d, %d%% compressible; %s\n",
		r.FioVersion, st.IOEngine, r.Kernel, st.DeviceSizeBytes>>20, st.Dir, st.RuntimeSeconds, st.IODepth, st.CompressiblePercent, r.Azurite)
	fmt.Fprint(w, "ceiling (raw 4 MiB Put Page):")
	for i, c := range r.Ceiling.Runs {
		sep := ","
		if i == 0 {
			sep = ""
		}
		fmt.Fprintf(w, "%s %d client(s) %.1f MB/s%s", sep, c.Clients, c.MBPerSec, fmtAzuriteCPU(c.AzuriteCPU))
	}
	fmt.Fprintf(w, " -> ceiling %.1f MB/s\n", r.Ceiling.MBPerSec)
	for _, s := range r.Ceiling.Stored {
		fmt.Fprintf(w, "ceiling as stored (journal blob + %s Put Pages of the same bytes, %d clients): %.1f MB/s = %.2f × ceiling%s\n",
			fmtSize(s.BlockSize), s.Clients, s.MBPerSec, s.CeilingRatio, fmtAzuriteCPU(s.AzuriteCPU))
	}
	fmt.Fprintf(w, "initial sync of %d MiB: %.1f s\n", st.DeviceSizeBytes>>20, r.InitialSyncSeconds)

	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "level\tbs\trate MB/s\tchurn MB/s\tpipeline MB/s\t×ceiling\tRPO p50\tRPO p99\tapply p50\tapply p99\tcatch-up s\tPS s/GB\tbefore upload\tagent s/GB\tazurite CPU\tsealed/raw\t  sustained")
	for _, l := range r.Levels {
		sus := "yes"
		if !l.Sustained {
			sus = "no: " + l.Reason
		}
		fmt.Fprintf(tw, "%s\t%s\t%.1f\t%.1f\t%.1f\t%.2f\t%.2f\t%.2f\t%.2f\t%.2f\t%.1f/%.1f\t%s\t%s\t%s\t%s\t%s\t  %s\n",
			l.Label, fmtSize(l.BlockSize), l.RateMBPerSec, l.ChurnMBPerSec, l.PipelineMBPerSec, l.CeilingRatio,
			l.RPOP50Seconds, l.RPOP99Seconds, l.ApplyLagP50Seconds, l.ApplyLagP99Seconds,
			l.JournalCatchUpSeconds, l.ReplicaCatchUpSeconds,
			fmtFloat(l.PSCPUSecondsPerGB, 2), fmtFloat(l.BeforeUploadCPUSecondsPerGB, 2), fmtFloat(l.AgentCPUSecondsPerGB, 2), fmtFloat(l.AzuriteCPU, 2), fmtFloat(l.CompressionRatio, 3), sus)
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write pipeline report table: %w", err)
	}
	for _, s := range r.Sustained {
		bound := ""
		if s.LowerBound {
			bound = " (at least: the highest rate tried was sustained)"
		}
		fmt.Fprintf(w, "highest sustained churn, %s: %.1f MB/s = %.2f × ceiling%s\n", fmtSize(s.BlockSize), s.MBPerSec, s.CeilingRatio, bound)
	}
	if err := writeGoals(w, r.Goals); err != nil {
		return fmt.Errorf("write pipeline report table: %w", err)
	}
	if r.BeforeUploadProratedCPUSecondsPerGB != nil {
		fmt.Fprintf(w, "  (before upload with the unlabelled CPU, GC and scheduler, prorated: %.2f s/GB)\n", *r.BeforeUploadProratedCPUSecondsPerGB)
	}
	_, err := fmt.Fprintf(w, "RPO = manifest read time − recoverable_until (every %d ms, during fio); apply = durable_seq first seen → applied_seq reaching it; catch-up = after fio: journal/replica;\n"+
		"pipeline MB/s = churn if sustained, else bytes ÷ time until the journal and the replica held them; PS s/GB per GB received, includes its applier and uploads; azurite CPU = cores Azurite used (1 = its one thread saturated); sealed/raw = journal blob bytes ÷ bytes received\n",
		st.SampleIntervalMs)
	return err
}

// fmtAzuriteCPU formats a ceiling run's Azurite CPU for the table.
func fmtAzuriteCPU(cores *float64) string {
	if cores == nil {
		return ""
	}
	return fmt.Sprintf(" (azurite %.2f CPU)", *cores)
}

// fmtSize formats a block size as fio would write it ("64k", "4k", "1m").
func fmtSize(n int64) string {
	switch {
	case n >= 1<<20 && n%(1<<20) == 0:
		return strconv.FormatInt(n>>20, 10) + "m"
	case n >= 1<<10 && n%(1<<10) == 0:
		return strconv.FormatInt(n>>10, 10) + "k"
	}
	return strconv.FormatInt(n, 10)
}

// setStages records the process server's CPU seconds per stage over the
// fio window, in which it received recv bytes.
func (l *PipelineLevel) setStages(cpu map[string]float64, recv int64) {
	if recv <= 0 {
		return
	}
	gb := float64(recv) / 1e9
	l.StageCPUSeconds, l.WindowReceivedBytes = cpu, recv
	l.StageCPUSecondsPerGB = map[string]float64{}
	var before float64
	for k, v := range cpu {
		l.StageCPUSecondsPerGB[k] = v / gb
	}
	for _, k := range BeforeUploadStages {
		before += cpu[k] / gb
	}
	l.BeforeUploadCPUSecondsPerGB = &before
}

// stages formats the CPU seconds per GB by stage, e.g. "ingest 0.61,
// prepare 0.40, upload 0.90, apply 3.10, other 0.50".
func (l PipelineLevel) stages() string {
	if len(l.StageCPUSecondsPerGB) == 0 {
		return "no profile"
	}
	names := append(append([]string{}, BeforeUploadStages...), stage.Upload, stage.Apply, StageOther)
	var parts []string
	for _, n := range names {
		parts = append(parts, fmt.Sprintf("%s %.2f", n, l.StageCPUSecondsPerGB[n]))
	}
	return strings.Join(parts, ", ")
}
