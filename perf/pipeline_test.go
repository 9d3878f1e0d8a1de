package perf

import (
	"bytes"
	"context"
	"encoding/json"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/stage"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

func TestPercentile(t *testing.T) {
	for _, tc := range []struct {
		in   []float64
		p    float64
		want float64
	}{
		{nil, 50, 0},
		{[]float64{7}, 99, 7},
		{[]float64{3, 1, 2}, 50, 2},
		{[]float64{4, 1, 3, 2}, 50, 2.5},
		{[]float64{1, 2, 3, 4, 5}, 0, 1},
		{[]float64{1, 2, 3, 4, 5}, 100, 5},
		{[]float64{1, 2, 3, 4, 5}, 75, 4},
		{[]float64{0, 10}, 99, 9.9}, // interpolates between ranks
	} {
		in := slices.Clone(tc.in)
		if got := percentile(tc.in, tc.p); math.Abs(got-tc.want) > 1e-9 {
			t.Errorf("percentile(%v, %v) = %v, want %v", tc.in, tc.p, got, tc.want)
		}
		if !slices.Equal(in, tc.in) {
			t.Errorf("percentile modified its input: %v -> %v", in, tc.in)
		}
	}
	// p99 of 100 samples 1..100 lies between the two largest.
	xs := make([]float64, 100)
	for i := range xs {
		xs[100-1-i] = float64(i + 1)
	}
	if got := percentile(xs, 99); got < 99 || got > 100 {
		t.Errorf("p99 of 1..100 = %v", got)
	}
}

var t0 = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

// series returns values f(s) sampled every 250 ms over [t0, t0+d].
func series(d time.Duration, f func(s float64) float64) []timed {
	var out []timed
	for at := time.Duration(0); at <= d; at += 250 * time.Millisecond {
		out = append(out, timed{t0.Add(at), f(at.Seconds())})
	}
	return out
}

func TestGrowth(t *testing.T) {
	end := t0.Add(20 * time.Second)
	// A sawtooth between 1 and 2 s (markers every second) does not grow.
	saw := series(20*time.Second, func(s float64) float64 { return 1 + math.Mod(s, 1) })
	d, span, ok := growth(saw, t0, end)
	if !ok || math.Abs(d) > 0.1 || growing(d, span) {
		t.Errorf("sawtooth: growth %v over %v s (ok %v)", d, span, ok)
	}
	// Half the churn backlogged: RPO grows by 0.5 s per second.
	lin := series(20*time.Second, func(s float64) float64 { return 1 + 0.5*s })
	d, span, ok = growth(lin, t0, end)
	if !ok || math.Abs(span-13.5) > 1e-9 || math.Abs(d-0.5*span) > 0.2 || !growing(d, span) {
		t.Errorf("linear: growth %v over %v s (ok %v), want ≈ %v over 13.5 s", d, span, ok, 0.5*13.5)
	}
	// 2% short is within tolerance, 5% is not; noise below minGrowth
	// never counts.
	if growing(0.02*13.5, 13.5) || growing(0.45, 3) || !growing(0.05*13.5, 13.5) {
		t.Error("growth misjudged around the 3% tolerance")
	}
	// Samples only in the ramp-up: nothing to compare.
	if _, _, ok := growth(series(time.Second, func(float64) float64 { return 1 }), t0, end); ok {
		t.Error("growth without samples in both quarters reported ok")
	}
}

func TestApplyLags(t *testing.T) {
	s := func(ms int, durable, applied uint64) manifestSample {
		return manifestSample{At: t0.Add(time.Duration(ms) * time.Millisecond), Durable: durable, Applied: applied}
	}
	got := applyLags([]manifestSample{
		s(0, 10, 10),    // settled: no lag pending
		s(250, 20, 10),  // 20 seen
		s(500, 30, 10),  // 30 seen
		s(750, 30, 25),  // 20 applied: 500 ms
		s(1000, 40, 40), // 30 applied after 500 ms; 40 seen and applied at once
		s(1250, 40, 40),
		s(1500, 50, 40), // never applied within the samples: no lag
	})
	want := []timed{{t0.Add(250 * time.Millisecond), 0.5}, {t0.Add(500 * time.Millisecond), 0.5}, {t0.Add(time.Second), 0}}
	if len(got) != len(want) {
		t.Fatalf("applyLags = %v, want %v", got, want)
	}
	for i := range want {
		if !got[i].t.Equal(want[i].t) || math.Abs(got[i].v-want[i].v) > 1e-9 {
			t.Errorf("lag %d = %v at %v, want %v at %v", i, got[i].v, got[i].t, want[i].v, want[i].t)
		}
	}
	if applyLags(nil) != nil {
		t.Error("lags from no samples")
	}
}

// levelSamples simulates manifest reads every 250 ms over a 20 s window
// where recoverable_until trails by rpo(s) and the replica applies each
// durable_seq 0.5 s after it appears.
func levelSamples(rpo func(s float64) float64) []manifestSample {
	var out []manifestSample
	for at := time.Duration(0); at <= 20*time.Second; at += 250 * time.Millisecond {
		now := t0.Add(at)
		seq := uint64(at / time.Second)
		applied := uint64(max(0, (at-500*time.Millisecond)/time.Second))
		out = append(out, manifestSample{
			At:               now,
			Durable:          seq,
			Applied:          applied,
			RecoverableUntil: now.Add(-time.Duration(rpo(at.Seconds()) * float64(time.Second))),
		})
	}
	return out
}

func TestEvaluateLevelSustained(t *testing.T) {
	l := PipelineLevel{RateMBPerSec: 20, ChurnMBPerSec: 19.9, BytesWritten: 400e6,
		ReceivedBytes: 401e6, SealedBytes: 200.5e6, PSCPUSeconds: 0.802, AgentCPUSeconds: 2}
	end := t0.Add(20 * time.Second)
	evaluateLevel(&l, levelSamples(func(s float64) float64 { return 1 + math.Mod(s, 1) }), t0, end, end.Add(2*time.Second), end.Add(2*time.Second), 50e6)
	if !l.Sustained || l.Reason != "" {
		t.Fatalf("flat RPO judged not sustained: %+v", l)
	}
	// Reads at .00, .25, .50, .75 s into each second see 1, 1.25, 1.5, 1.75 s.
	if l.RPOSamples != 81 || l.RPOP50Seconds != 1.25 || l.RPOP99Seconds != 1.75 || l.RPOMaxSeconds != 1.75 {
		t.Errorf("RPO: %d samples, p50 %v, p99 %v, max %v", l.RPOSamples, l.RPOP50Seconds, l.RPOP99Seconds, l.RPOMaxSeconds)
	}
	if l.ApplyLagSamples < 19 || l.ApplyLagP50Seconds != 0.5 || l.ApplyLagP99Seconds != 0.5 {
		t.Errorf("apply lag: %d samples, p50 %v, p99 %v", l.ApplyLagSamples, l.ApplyLagP50Seconds, l.ApplyLagP99Seconds)
	}
	if l.PipelineMBPerSec != 19.9 || math.Abs(l.CeilingRatio-19.9/50) > 1e-9 {
		t.Errorf("sustained pipeline = %v MB/s (%v × ceiling), want the churn", l.PipelineMBPerSec, l.CeilingRatio)
	}
	if *l.CompressionRatio != 0.5 || math.Abs(*l.PSCPUSecondsPerGB-2) > 1e-9 || *l.AgentCPUSecondsPerGB != 5 {
		t.Errorf("ratio %v, PS %v s/GB, agent %v s/GB", *l.CompressionRatio, *l.PSCPUSecondsPerGB, *l.AgentCPUSecondsPerGB)
	}
}

func TestEvaluateLevelBacklogGrows(t *testing.T) {
	l := PipelineLevel{RateMBPerSec: 60, ChurnMBPerSec: 60, BytesWritten: 1200e6}
	end := t0.Add(20 * time.Second)
	evaluateLevel(&l, levelSamples(func(s float64) float64 { return 1 + 0.4*s }), t0, end, end.Add(10*time.Second), end.Add(5*time.Second), 50e6)
	if l.Sustained || !strings.Contains(l.Reason, "RPO grew") {
		t.Fatalf("growing RPO judged sustained: %+v", l)
	}
	if l.PipelineMBPerSec != 40 || l.CeilingRatio != 0.8 {
		t.Errorf("saturated pipeline = %v MB/s (%v × ceiling), want 1200 MB in 30 s = 40", l.PipelineMBPerSec, l.CeilingRatio)
	}
	if l.CompressionRatio != nil || l.PSCPUSecondsPerGB != nil {
		t.Errorf("ratios without received bytes: %v %v", l.CompressionRatio, l.PSCPUSecondsPerGB)
	}

	short := PipelineLevel{RateMBPerSec: 100, ChurnMBPerSec: 70, BytesWritten: 1400e6}
	evaluateLevel(&short, levelSamples(func(float64) float64 { return 1 }), t0, end, end.Add(time.Second), end.Add(time.Second), 50e6)
	if short.Sustained || !strings.Contains(short.Reason, "fio reached only 70%") {
		t.Errorf("fio shortfall judged sustained: %+v", short)
	}
	// A replica that grows no lag the samples show, but takes long to
	// catch up once fio stops, did not keep up; the pipeline figure is
	// what it moved by then.
	slow := PipelineLevel{RateMBPerSec: 20, ChurnMBPerSec: 20, BytesWritten: 400e6, ReplicaCatchUpSeconds: 5}
	evaluateLevel(&slow, levelSamples(func(s float64) float64 { return 1 + math.Mod(s, 1) }), t0, end, end.Add(time.Second), end.Add(5*time.Second), 50e6)
	if slow.Sustained || !strings.Contains(slow.Reason, "replica caught up 5.0 s after fio") || slow.PipelineMBPerSec != 16 {
		t.Errorf("slow replica: sustained %v (%s), pipeline %v MB/s; want not sustained, 400 MB in 25 s = 16", slow.Sustained, slow.Reason, slow.PipelineMBPerSec)
	}
	none := PipelineLevel{RateMBPerSec: 10, ChurnMBPerSec: 10}
	evaluateLevel(&none, nil, t0, end, end, end, 50e6)
	if none.Sustained || none.RPOSamples != 0 {
		t.Errorf("level without samples judged sustained: %+v", none)
	}
}

func TestNextSearchRate(t *testing.T) {
	const maxRate = 100e6
	// Both standard levels sustained: step up from the higher.
	tried := []ratePoint{{20e6, true}, {30e6, true}}
	next, ok := nextSearchRate(tried, maxRate)
	if !ok || next != 37.5e6 {
		t.Fatalf("after 20, 30 sustained: %v %v, want 37.5 MB/s", next, ok)
	}
	// The step fails: bisect between 37.5 and 46.875.
	tried = append(tried, ratePoint{37.5e6, true}, ratePoint{46.875e6, false})
	next, ok = nextSearchRate(tried, maxRate)
	if want := math.Sqrt(37.5e6 * 46.875e6); !ok || math.Abs(next-want) > 1 {
		t.Fatalf("bisect: %v %v, want %v", next, ok, want)
	}
	// Within resolution: done.
	tried = append(tried, ratePoint{next, true})
	if next, ok := nextSearchRate(tried, maxRate); ok {
		t.Errorf("search continued to %v within resolution", next)
	}
	// Nothing sustained: step down, but not below 1 MB/s.
	if next, ok := nextSearchRate([]ratePoint{{20e6, false}, {30e6, false}}, maxRate); !ok || math.Abs(next-14e6) > 1 {
		t.Errorf("step down = %v %v, want 14 MB/s", next, ok)
	}
	if _, ok := nextSearchRate([]ratePoint{{1.2e6, false}}, maxRate); ok {
		t.Error("search went below 1 MB/s")
	}
	// Capped at maxRate.
	if next, ok := nextSearchRate([]ratePoint{{90e6, true}}, maxRate); !ok || next != maxRate {
		t.Errorf("near cap = %v %v, want %v", next, ok, maxRate)
	}
	if _, ok := nextSearchRate([]ratePoint{{maxRate, true}}, maxRate); ok {
		t.Error("search went past the cap")
	}
	// A failure below the highest pass (noise) does not bound the search.
	if next, ok := nextSearchRate([]ratePoint{{20e6, false}, {30e6, true}}, maxRate); !ok || next != 37.5e6 {
		t.Errorf("with a failure below the pass = %v %v", next, ok)
	}
}

// testReport is a finished report of a standard run: 20 MB/s and half the
// ceiling sustained, the search fails above 40 MB/s.
func testReport() *PipelineReport {
	lv := func(label string, rate, churn float64, sustained bool, p99 float64) PipelineLevel {
		l := PipelineLevel{Label: label, BlockSize: 64 << 10, RateMBPerSec: rate, ChurnMBPerSec: churn, PipelineMBPerSec: churn,
			CeilingRatio: churn / 60, RPOP50Seconds: 1, RPOP99Seconds: p99, RPOSamples: 56, Sustained: sustained,
			ReceivedBytes: int64(churn * 20e6), PSCPUSeconds: churn * 20e6 / 1e9 * 0.5, AzuriteCPU: ptr(churn / 50)}
		if !sustained {
			l.Reason = "RPO grew 3.0 s in 14 s"
		}
		// The fio window saw 90% of the bytes; 0.3 + 0.1 s/GB before upload.
		recv := int64(churn * 18e6)
		gb := float64(recv) / 1e9
		l.setStages(map[string]float64{stage.Ingest: 0.3 * gb, stage.Prepare: 0.1 * gb, stage.Upload: 0.4 * gb, stage.Apply: 2 * gb, StageOther: 0.2 * gb}, recv)
		return l
	}
	r := &PipelineReport{
		FioVersion: "fio-3.33", Kernel: "6.18.0", Azurite: "azurite 3.37.0 on 127.0.0.1:1 (disk)",
		Settings: PipelineSettings{Dir: "/dev/shm", DeviceSizeBytes: 1 << 30, RuntimeSeconds: 20, IOEngine: "io_uring",
			IODepth: 8, BlockSizes: []int64{64 << 10}, Search: true, SampleIntervalMs: 250},
		Ceiling: PipelineCeiling{MBPerSec: 60, Runs: []CeilingRun{{Clients: 1, MBPerSec: 50}, {Clients: 4, MBPerSec: 60, AzuriteCPU: ptr(0.97)}},
			Stored: []StoredRun{{BlockSize: 64 << 10, CeilingRun: CeilingRun{Clients: 4, MBPerSec: 27, AzuriteCPU: ptr(0.99)}, CeilingRatio: 0.45}}},
		Levels: []PipelineLevel{
			lv(LevelASR, 20, 20, true, 1.5),
			lv(LevelHalfCeiling, 30, 30, true, 2.5),
			lv(LevelSearch, 37.5, 37.4, true, 1.9),
			lv(LevelSearch, 46.9, 46.9, false, 9),
			lv(LevelSearch, 41.9, 41.8, false, 5),
		},
	}
	r.finish()
	return r
}

func TestPipelineFinishGoals(t *testing.T) {
	r := testReport()
	if len(r.Sustained) != 1 || r.Sustained[0].MBPerSec != 37.4 || r.Sustained[0].LowerBound {
		t.Fatalf("sustained = %+v, want 37.4 MB/s, bounded", r.Sustained)
	}
	if math.Abs(r.Sustained[0].CeilingRatio-37.4/60) > 1e-9 {
		t.Errorf("ratio = %v", r.Sustained[0].CeilingRatio)
	}
	if r.PSCPUSecondsPerGB == nil || math.Abs(*r.PSCPUSecondsPerGB-0.5) > 1e-9 {
		t.Errorf("PS s/GB = %v, want 0.5", r.PSCPUSecondsPerGB)
	}
	// "other" (0.2 s/GB) shared as the labelled stages share the rest:
	// before upload takes 0.4 of their 2.8.
	if p := r.BeforeUploadProratedCPUSecondsPerGB; p == nil || math.Abs(*p-(0.4+0.2*0.4/2.8)) > 1e-9 {
		t.Errorf("prorated before upload = %v, want %v", p, 0.4+0.2*0.4/2.8)
	}
	wantVal := []float64{1.5, 2.5, 37.4 / 60, 0.4}
	wantMet := []bool{true, false, false, true}
	if len(r.Goals) != 4 {
		t.Fatalf("goals = %+v", r.Goals)
	}
	for i, g := range r.Goals {
		if g.Value == nil || math.Abs(*g.Value-wantVal[i]) > 1e-9 || g.Met == nil || *g.Met != wantMet[i] {
			t.Errorf("goal %q = %v met %v, want %v met %v", g.Goal, g.Value, g.Met, wantVal[i], wantMet[i])
		}
	}

	// Not measured is not met: a level without RPO samples, or whose fio
	// fell short of the rate; a profile without labelled samples.
	short := testReport()
	short.Levels[0].RPOSamples = 0
	short.Levels[1].ChurnMBPerSec = 20 // of 30
	for i := range short.Levels {
		short.Levels[i].setStages(map[string]float64{StageOther: 1}, 1e9)
	}
	short.finish()
	if short.Goals[0].Met != nil || short.Goals[1].Met != nil || short.Goals[3].Value != nil || short.Goals[3].Met != nil {
		t.Errorf("goals with nothing measured: %s %v, %s %v, %s %v", short.Goals[0].Goal, short.Goals[0].Met, short.Goals[1].Goal, short.Goals[1].Met, short.Goals[3].Goal, short.Goals[3].Value)
	}

	// Explicit rates: the RPO goals are not measured; a sustained top
	// rate is only a lower bound, which below the goal says nothing.
	r.Levels = []PipelineLevel{{Label: LevelRate, BlockSize: 64 << 10, RateMBPerSec: 10, ChurnMBPerSec: 10, Sustained: true}}
	r.finish()
	if r.Goals[0].Value != nil || r.Goals[0].Met != nil || r.Goals[1].Met != nil || r.PSCPUSecondsPerGB != nil {
		t.Errorf("goals without standard levels = %+v", r.Goals)
	}
	if !r.Sustained[0].LowerBound {
		t.Error("sustained top rate not marked as a lower bound")
	}
	if r.Goals[2].Met != nil {
		t.Errorf("a lower bound of %v × ceiling judged against the goal: met %v", *r.Goals[2].Value, *r.Goals[2].Met)
	}
}

func TestPipelineWriteTableAndJSON(t *testing.T) {
	r := testReport()
	var tb bytes.Buffer
	if err := r.WriteTable(&tb); err != nil {
		t.Fatal(err)
	}
	out := tb.String()
	t.Logf("\n%s", out)
	lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
	// run, ceiling, stored ceiling, sync, header, 5 levels, sustained, "goals:", 4 goals, prorated, 2 footnotes
	if len(lines) != 4+1+5+1+1+4+1+2 {
		t.Fatalf("table has %d lines", len(lines))
	}
	for _, want := range []string{
		"1 client(s) 50.0 MB/s, 4 client(s) 60.0 MB/s (azurite 0.97 CPU) -> ceiling 60.0 MB/s",
		"ceiling as stored (journal blob + 64k Put Pages of the same bytes, 4 clients): 27.0 MB/s = 0.45 × ceiling (azurite 0.99 CPU)",
		"highest sustained churn, 64k: 37.4 MB/s = 0.62 × ceiling\n",
		"no: RPO grew 3.0 s in 14 s",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q", want)
		}
	}
	// Columns are aligned: every level row is as wide as the header.
	header := lines[4]
	if !strings.Contains(header, "azurite CPU") || !strings.Contains(lines[5], " 0.40 ") {
		t.Errorf("Azurite's CPU (0.40 cores at 20 MB/s) missing from the table:\n%s\n%s", header, lines[5])
	}
	for _, row := range lines[5:10] {
		if !strings.Contains(row, "asr-20MB/s") && !strings.Contains(row, "half-ceiling") && !strings.Contains(row, "search") {
			t.Errorf("unexpected row %q", row)
		}
		if !strings.HasSuffix(header, "sustained") || len(row) < len(header)-20 {
			t.Errorf("row %q not aligned with header %q", row, header)
		}
	}
	goals := strings.Join(lines[12:16], "\n")
	if strings.Count(goals, "NOT met") != 2 || strings.Count(goals, " met") != 4 || !strings.Contains(lines[13], "2.50 s") {
		t.Errorf("goals:\n%s", goals)
	}

	var jb bytes.Buffer
	if err := r.WriteJSON(&jb); err != nil {
		t.Fatal(err)
	}
	var back PipelineReport
	if err := json.Unmarshal(jb.Bytes(), &back); err != nil {
		t.Fatal(err)
	}
	if len(back.Levels) != 5 || back.Levels[3].Reason == "" || back.Ceiling.MBPerSec != 60 || len(back.Goals) != 4 || *back.Goals[1].Met {
		t.Errorf("JSON round trip lost data: %s", jb.String())
	}
	if !strings.Contains(jb.String(), `"rpo_p99_seconds": 2.5`) {
		t.Errorf("JSON lacks snake_case RPO field:\n%s", jb.String())
	}
}

func TestParseMetrics(t *testing.T) {
	in := `# HELP lifeboat_ps_received_bytes_total Bytes received.
# TYPE lifeboat_ps_received_bytes_total counter
lifeboat_ps_received_bytes_total 1.234567891e+09
lifeboat_ps_durable_seq{machine="bench"} 42
process_cpu_seconds_total 3.5 1700000000000
`
	m, err := parseMetrics(strings.NewReader(in))
	if err != nil {
		t.Fatal(err)
	}
	if m[metricReceived] != 1234567891 || m["process_cpu_seconds_total"] != 3.5 || len(m) != 2 {
		t.Errorf("parseMetrics = %v", m)
	}
	if _, err := parseMetrics(strings.NewReader("x notanumber\n")); err == nil {
		t.Error("bad value accepted")
	}
}

func TestParseBlockSizesAndFmtSize(t *testing.T) {
	got, err := ParseBlockSizes([]string{"64k", " 4K", "1m", "8192"})
	if err != nil || !slices.Equal(got, []int64{64 << 10, 4 << 10, 1 << 20, 8192}) {
		t.Errorf("ParseBlockSizes = %v, %v", got, err)
	}
	for _, bad := range []string{"", "k", "-4k", "4x"} {
		if _, err := ParseBlockSizes([]string{bad}); err == nil {
			t.Errorf("ParseBlockSizes(%q) accepted", bad)
		}
	}
	for n, want := range map[int64]string{64 << 10: "64k", 4 << 10: "4k", 2 << 20: "2m", 1536: "1536"} {
		if got := fmtSize(n); got != want {
			t.Errorf("fmtSize(%d) = %q, want %q", n, got, want)
		}
	}
}

func TestPipelineFioArgs(t *testing.T) {
	cfg, err := PipelineConfig{Runtime: 3 * time.Second, IOEngine: "libaio"}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	args := strings.Join(pipelineFioArgs(cfg, "/dev/loop7", 64<<10, 20e6, "/o.json"), " ")
	for _, want := range []string{"--filename=/dev/loop7", "--rw=randwrite", "--bs=65536", "--rate=20000000",
		"--runtime=3000ms", "--iodepth=8", "--ioengine=libaio", "--direct=1", "--refill_buffers", "--output=/o.json"} {
		if !strings.Contains(args, want) {
			t.Errorf("fio args %q lack %q", args, want)
		}
	}
	if strings.Contains(args, "buffer_compress") {
		t.Errorf("incompressible run asks for compressible buffers: %q", args)
	}
	cfg.CompressiblePercent = 50
	if args := strings.Join(pipelineFioArgs(cfg, "/d", 4096, 1e6, "/o"), " "); !strings.Contains(args, "--buffer_compress_percentage=50") {
		t.Errorf("fio args %q lack compressibility", args)
	}
}

func TestPipelineConfigDefaultsAndErrors(t *testing.T) {
	cfg, err := PipelineConfig{}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Dir != "/dev/shm" || cfg.Runtime != 20*time.Second || cfg.DeviceSize != 1<<30 ||
		!slices.Equal(cfg.BlockSizes, []int64{64 << 10}) || cfg.SampleInterval != 250*time.Millisecond {
		t.Errorf("defaults = %+v", cfg)
	}
	// 20 MB/s × 20 s, rounded up to whole 4 MiB Put Pages.
	if cfg.CeilingBytes != 96*(4<<20) {
		t.Errorf("default ceiling bytes = %d", cfg.CeilingBytes)
	}
	for _, tc := range []struct {
		name string
		cfg  PipelineConfig
		want string
	}{
		{"short runtime", PipelineConfig{Runtime: 500 * time.Millisecond}, "minimum 1s"},
		{"odd size", PipelineConfig{DeviceSize: 64<<20 + 1}, "multiple of 512"},
		{"tiny rate", PipelineConfig{Rates: []float64{10}}, "below 0.1 MB/s"},
		{"NaN rate", PipelineConfig{Rates: []float64{math.NaN()}}, "below 0.1 MB/s"},
		{"bad bs", PipelineConfig{BlockSizes: []int64{1000}}, "multiple of 512"},
		{"dup bs", PipelineConfig{BlockSizes: []int64{4096, 4096}}, "twice"},
		{"compress", PipelineConfig{CompressiblePercent: 100}, "0-99"},
		{"no fio", PipelineConfig{Fio: "/nonexistent/fio"}, "apt-get install fio"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := RunPipeline(context.Background(), tc.cfg, discardLog(), nil)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("RunPipeline error = %v, want it to mention %q", err, tc.want)
			}
		})
	}
}

// processesMentioning returns the command lines of processes whose
// arguments contain s.
func processesMentioning(s string) []string {
	var out []string
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && bytes.Contains(b, []byte(s)) {
			out = append(out, strings.ReplaceAll(string(b), "\x00", " "))
		}
	}
	return out
}

// TestRunPipelineShort runs the real pipeline (a lifeboat binary built
// from this module, Azurite, fio) for one short level and checks the
// report and that nothing is left behind.
func TestRunPipelineShort(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireBTF(t)
	testenv.RequireTool(t, "fio")
	testenv.RequireTool(t, "node")
	goTool := testenv.RequireTool(t, "go")
	bin := filepath.Join(t.TempDir(), "lifeboat")
	if out, err := exec.Command(goTool, "build", "-o", bin, "github.com/lifeboat-dr/lifeboat/cmd/lifeboat").CombinedOutput(); err != nil {
		t.Fatalf("go build lifeboat: %v\n%s", err, out)
	}
	dir, work := t.TempDir(), t.TempDir()
	var progress bytes.Buffer
	start := time.Now()
	rep, err := RunPipeline(context.Background(), PipelineConfig{
		Exe:          bin,
		Dir:          dir,
		WorkDir:      work,
		DeviceSize:   64 << 20,
		Runtime:      3 * time.Second,
		Rates:        []float64{10e6},
		SkipSearch:   true,
		CeilingBytes: 32 << 20,
		DrainTimeout: time.Minute,
	}, discardLog(), &progress)
	t.Logf("took %s; progress:\n%s", time.Since(start), progress.String())
	assertNoLoopInto(t, dir)
	if ents, _ := os.ReadDir(work); len(ents) > 0 {
		t.Errorf("files left in the work directory: %v", ents)
	}
	if ps := processesMentioning(work); len(ps) > 0 {
		t.Errorf("processes left running: %q", ps)
	}
	if err != nil {
		t.Fatal(err)
	}
	var tb bytes.Buffer
	if err := rep.WriteTable(&tb); err != nil {
		t.Fatal(err)
	}
	t.Logf("\n%s", tb.String())

	if rep.Ceiling.MBPerSec <= 0 || len(rep.Ceiling.Runs) != 2 || rep.Ceiling.Runs[1].Clients != 4 {
		t.Errorf("ceiling = %+v", rep.Ceiling)
	}
	// Azurite's CPU is read from its process: busy while written to.
	for _, c := range append(rep.Ceiling.Runs, rep.Ceiling.Stored[0].CeilingRun) {
		if c.AzuriteCPU == nil || *c.AzuriteCPU <= 0.05 || *c.AzuriteCPU > 2.5 {
			t.Errorf("ceiling run %+v: Azurite CPU %s cores", c, fmtFloat(c.AzuriteCPU, 2))
		}
	}
	if len(rep.Levels) != 1 {
		t.Fatalf("levels = %+v, want one", rep.Levels)
	}
	l := rep.Levels[0]
	// fio's rate is a cap: a loaded runner may write less, never more.
	if l.Label != LevelRate || l.RateMBPerSec != 10 || l.ChurnMBPerSec <= 0 || l.ChurnMBPerSec > 11 {
		t.Errorf("level churn: %+v", l)
	}
	if l.AzuriteCPU == nil || *l.AzuriteCPU <= 0 || *l.AzuriteCPU > 2.5 {
		t.Errorf("level's Azurite CPU = %s cores", fmtFloat(l.AzuriteCPU, 2))
	}
	// 3 s at 4 reads/s; the first reads may still show the previous state,
	// and a loaded runner may take fewer.
	if l.RPOSamples < 2 || l.RPOP50Seconds <= 0 || l.RPOP99Seconds < l.RPOP50Seconds || l.RPOP99Seconds > 30 {
		t.Errorf("RPO: %d samples, p50 %v, p99 %v", l.RPOSamples, l.RPOP50Seconds, l.RPOP99Seconds)
	}
	if l.ReceivedBytes < l.BytesWritten || l.Segments == 0 || l.JournalCatchUpSeconds < 0 || l.ReplicaCatchUpSeconds < l.JournalCatchUpSeconds {
		t.Errorf("level accounting: %+v", l)
	}
	// fio refills its buffers with random data: the journal cannot
	// compress it (only seal overhead and frame headers differ).
	if l.CompressionRatio == nil || *l.CompressionRatio < 0.95 || *l.CompressionRatio > 1.1 {
		t.Errorf("compression ratio of random churn = %v", fmtFloat(l.CompressionRatio, 3))
	}
	if l.PSCPUSecondsPerGB == nil || *l.PSCPUSecondsPerGB <= 0 {
		t.Errorf("PS CPU per GB = %v", l.PSCPUSecondsPerGB)
	}
	if rep.InitialSyncSeconds <= 0 || len(rep.Goals) != 4 || rep.Goals[0].Value != nil {
		t.Errorf("report: sync %v s, goals %+v", rep.InitialSyncSeconds, rep.Goals)
	}
}

func TestManifestSamplerWindows(t *testing.T) {
	s := newManifestSampler(nil, "m", time.Second, discardLog())
	for i := range 5 {
		s.samples = append(s.samples, manifestSample{At: t0.Add(time.Duration(i) * time.Second), Durable: uint64(i)})
	}
	if got := s.firstAt(t0.Add(1500 * time.Millisecond)); got != 2 {
		t.Errorf("firstAt(1.5 s) = %d, want 2", got)
	}
	if got := s.firstAt(t0.Add(time.Second)); got != 1 {
		t.Errorf("firstAt(1 s) = %d, want 1 (inclusive)", got)
	}
	if got := s.firstAt(t0.Add(time.Hour)); got != 5 || s.since(got) != nil {
		t.Errorf("firstAt after the last sample = %d", got)
	}
	w := s.between(t0.Add(time.Second), t0.Add(3*time.Second))
	if len(w) != 3 || w[0].Durable != 1 || w[2].Durable != 3 {
		t.Errorf("between(1 s, 3 s) = %+v, want samples 1..3", w)
	}
	if l, ok := s.latest(); !ok || l.Durable != 4 {
		t.Errorf("latest = %+v, %v", l, ok)
	}
}
