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
	if len(lines) != 5 || !strings.HasPrefix(lines[4], "* ") {
		t.Fatalf("table has %d lines, want header+columns+2 rows+footnote:\n%s", len(lines), tb.String())
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
