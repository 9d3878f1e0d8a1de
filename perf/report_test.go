package perf

import (
	"bytes"
	"encoding/json"
	"math"
	"strings"
	"testing"
)

func TestMedian(t *testing.T) {
	for _, tc := range []struct {
		in   []float64
		want float64
	}{
		{nil, 0},
		{[]float64{7}, 7},
		{[]float64{3, 1, 2}, 2},
		{[]float64{4, 1, 3, 2}, 2.5},
		{[]float64{10, 10, 1000}, 10}, // robust to one outlier round
	} {
		in := append([]float64(nil), tc.in...)
		if got := median(tc.in); got != tc.want {
			t.Errorf("median(%v) = %v, want %v", tc.in, got, tc.want)
		}
		for i := range in {
			if in[i] != tc.in[i] {
				t.Fatalf("median modified its input: %v -> %v", in, tc.in)
			}
		}
	}
}

func ptr[T any](v T) *T { return &v }

// threeRounds builds samples where the machine gets faster every round
// (drift) while the data variant always costs 20% IOPS and doubles p99.
func threeRounds() []CaptureSample {
	var ss []CaptureSample
	for r, base := range []float64{1000, 2000, 4000} {
		ss = append(ss,
			CaptureSample{Round: r + 1, Workload: "w", Variant: VariantNone, IOPS: base, BWBytes: base * 4096, P99WriteUs: 100},
			CaptureSample{Round: r + 1, Workload: "w", Variant: VariantData, IOPS: base * 0.8, BWBytes: base * 0.8 * 4096, P99WriteUs: 200,
				AgentCPUSecondsPerGB: ptr(float64(r + 1)), AgentCPUPercent: ptr(10.0 * float64(r+1)),
				AgentPeakRSSBytes: ptr(int64(100 << 20 * (r + 1))), OverflowEvents: ptr(int64(r)), Records: ptr(int64(10))},
		)
	}
	return ss
}

func TestSummarizePairsRoundsForRatios(t *testing.T) {
	res := summarize([]Workload{{Name: "w"}}, []Variant{VariantNone, VariantMetadata, VariantData}, threeRounds())
	if len(res) != 2 { // metadata had no samples
		t.Fatalf("got %d results, want 2: %+v", len(res), res)
	}
	none, data := res[0], res[1]
	if none.Variant != VariantNone || data.Variant != VariantData {
		t.Fatalf("result order = %s, %s", none.Variant, data.Variant)
	}
	if data.Rounds != 3 || data.IOPS != 1600 || data.P99WriteUs != 200 || data.MBPerSec != 1600*4096/1e6 {
		t.Errorf("data medians = %+v", data)
	}
	// Ratio of medians would also be 0.8 here, but per-round pairing must
	// hold even when the medians come from different rounds; check exactly.
	if data.IOPSRatio == nil || math.Abs(*data.IOPSRatio-0.8) > 1e-12 {
		t.Errorf("IOPS ratio = %v, want 0.8", data.IOPSRatio)
	}
	if data.P99WriteUsRatio == nil || *data.P99WriteUsRatio != 2 {
		t.Errorf("p99 ratio = %v, want 2", data.P99WriteUsRatio)
	}
	if *data.AgentCPUSecondsPerGB != 2 || *data.AgentCPUPercent != 20 {
		t.Errorf("agent CPU medians = %v s/GB, %v %%", *data.AgentCPUSecondsPerGB, *data.AgentCPUPercent)
	}
	if *data.AgentPeakRSSBytes != 300<<20 {
		t.Errorf("peak RSS = %d, want max over rounds %d", *data.AgentPeakRSSBytes, 300<<20)
	}
	if *data.OverflowEvents != 3 || *data.Records != 30 {
		t.Errorf("counters = %d overflows, %d records; want sums 3, 30", *data.OverflowEvents, *data.Records)
	}
	if none.AgentCPUPercent != nil || none.OverflowEvents != nil {
		t.Errorf("baseline has agent values: %+v", none)
	}
}

func TestSummarizeRatioUsesSameRound(t *testing.T) {
	// Round 2's baseline is missing: its data sample must not be compared
	// with another round's baseline.
	ss := []CaptureSample{
		{Round: 1, Workload: "w", Variant: VariantNone, IOPS: 100},
		{Round: 1, Workload: "w", Variant: VariantData, IOPS: 50},
		{Round: 2, Workload: "w", Variant: VariantData, IOPS: 1000},
	}
	res := summarize([]Workload{{Name: "w"}}, []Variant{VariantNone, VariantData}, ss)
	if r := res[1].IOPSRatio; r == nil || *r != 0.5 {
		t.Errorf("IOPS ratio = %v, want 0.5 from round 1 only", r)
	}
	noBase := summarize([]Workload{{Name: "w"}}, []Variant{VariantData}, ss[1:])
	if noBase[0].IOPSRatio != nil {
		t.Errorf("ratio without baseline = %v, want nil", *noBase[0].IOPSRatio)
	}
}

func TestWriteTableAndJSON(t *testing.T) {
	rep := &CaptureReport{
		FioVersion: "fio-3.33",
		Kernel:     "6.18.0",
		Settings:   CaptureSettings{RuntimeSeconds: 10, Rounds: 3, DeviceSizeBytes: 2 << 30, IOEngine: "io_uring"},
		Samples:    threeRounds(),
	}
	rep.Results = summarize([]Workload{{Name: "w"}}, []Variant{VariantNone, VariantData}, rep.Samples)

	var tb bytes.Buffer
	if err := rep.WriteTable(&tb); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimRight(tb.String(), "\n"), "\n")
	if len(lines) != 6 || !strings.HasPrefix(lines[4], "* ") || lines[5] != "goals:" {
		t.Fatalf("table has %d lines, want header+columns+2 rows+footnote+goals:\n%s", len(lines), tb.String())
	}
	if !strings.Contains(lines[0], "fio-3.33") || !strings.Contains(lines[0], "2048 MiB") {
		t.Errorf("description line = %q", lines[0])
	}
	// Aligned: every table line has the same display width.
	width := len([]rune(lines[1]))
	for _, l := range lines[2:4] {
		if len([]rune(l)) != width {
			t.Errorf("misaligned table:\n%s", tb.String())
			break
		}
	}
	noneRow, dataRow := strings.Fields(lines[2]), strings.Fields(lines[3])
	if noneRow[1] != "none" || noneRow[5] != "-" || noneRow[8] != "1.000" {
		t.Errorf("none row = %q", noneRow)
	}
	if dataRow[1] != "data" || dataRow[2] != "1600" || dataRow[7] != "300.0" || dataRow[8] != "0.800" || dataRow[11] != "3" {
		t.Errorf("data row = %q", dataRow)
	}

	var jb bytes.Buffer
	if err := rep.WriteJSON(&jb); err != nil {
		t.Fatal(err)
	}
	var back CaptureReport
	if err := json.Unmarshal(jb.Bytes(), &back); err != nil {
		t.Fatal(err)
	}
	if len(back.Results) != 2 || *back.Results[1].IOPSRatio != *rep.Results[1].IOPSRatio || len(back.Samples) != 6 {
		t.Errorf("JSON round trip lost data: %s", jb.String())
	}
	if strings.Contains(jb.String(), `"agent_cpu_percent": null`) {
		t.Errorf("absent agent values should be omitted, not null")
	}
}

// The goals are judged on the run's own results: IOPS ratios on the
// workloads run as fast as they go, overflows on the capped ones (not
// measured when fio fell short of the cap without overflowing), the
// largest agent RSS.
func TestCaptureGoals(t *testing.T) {
	f := func(v float64) *float64 { return &v }
	n := func(v int64) *int64 { return &v }
	wls := DefaultWorkloads()
	results := []CaptureResult{
		{Workload: "randwrite-4k", Variant: VariantMetadata, IOPSRatio: f(0.96), AgentPeakRSSBytes: n(20 << 20)},
		{Workload: "randwrite-4k", Variant: VariantData, IOPSRatio: f(0.80), AgentPeakRSSBytes: n(30 << 20)},
		{Workload: "seqwrite-1m", Variant: VariantMetadata, IOPSRatio: f(1.0)},
		{Workload: "randwrite-4k-400MBps", Variant: VariantData, MBPerSec: 398, OverflowEvents: n(0)},
		{Workload: "seqwrite-1m-400MBps", Variant: VariantData, MBPerSec: 300, OverflowEvents: n(0)},
	}
	goals := captureGoals(wls, results)
	type want struct {
		goal string
		val  *float64
		met  *bool
	}
	yes, no := true, false
	wants := []want{
		{"metadata mode ≥ 95% of no-capture IOPS, randwrite-4k", f(0.96), &yes},
		{"data mode ≥ 85% of no-capture IOPS, randwrite-4k", f(0.80), &no},
		{"metadata mode ≥ 95% of no-capture IOPS, seqwrite-1m", f(1.0), &yes},
		{"data mode ≥ 85% of no-capture IOPS, seqwrite-1m", nil, nil},
		{"no overflow in data mode at 400 MB/s, randwrite-4k-400MBps", f(0), &yes},
		{"no overflow in data mode at 400 MB/s, seqwrite-1m-400MBps", f(0), nil}, // 300 of 400 MB/s
		{"agent RSS besides the ring < 64 MiB", f(30), &yes},
	}
	if len(goals) != len(wants) {
		t.Fatalf("goals = %+v", goals)
	}
	eq := func(a, b *float64) bool { return a == nil && b == nil || a != nil && b != nil && *a == *b }
	eqb := func(a, b *bool) bool { return a == nil && b == nil || a != nil && b != nil && *a == *b }
	for i, w := range wants {
		g := goals[i]
		if g.Goal != w.goal || !eq(g.Value, w.val) || !eqb(g.Met, w.met) {
			t.Errorf("goal %d = %q %v met %v, want %q %v met %v", i, g.Goal, g.Value, g.Met, w.goal, w.val, w.met)
		}
	}
	// An overflow fails the goal whatever rate fio reached.
	results[4].OverflowEvents = n(2)
	if g := captureGoals(wls, results)[5]; g.Met == nil || *g.Met {
		t.Errorf("overflows at the capped rate: %+v", g)
	}
}
