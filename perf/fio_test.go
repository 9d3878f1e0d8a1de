package perf

import (
	"os"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestParseFioSample(t *testing.T) {
	data, err := os.ReadFile("testdata/fio-randwrite.json")
	if err != nil {
		t.Fatal(err)
	}
	got, err := parseFio(data)
	if err != nil {
		t.Fatal(err)
	}
	want := fioResult{
		IOPS:      126271.364318,
		BWBytes:   517207508,
		IOBytes:   1034932224,
		RuntimeMs: 2001,
		P99Ns:     464896,
		MeanNs:    246290.401189,
		UsrCPU:    8.35,
		SysCPU:    82.05,
	}
	if got != want {
		t.Errorf("parseFio = %+v, want %+v", got, want)
	}

	// fio sometimes prints warnings before the JSON document.
	noisy := append([]byte("fio: file hash not empty on exit\n"), data...)
	if got2, err := parseFio(noisy); err != nil || got2 != want {
		t.Errorf("parseFio with leading warning = %+v, %v", got2, err)
	}
}

func TestParseFioErrors(t *testing.T) {
	for _, tc := range []struct{ name, in, want string }{
		{"empty", "", "no JSON object"},
		{"no jobs", `{"jobs":[]}`, "no jobs"},
		{"job error", `{"jobs":[{"jobname":"x","error":5,"write":{"io_bytes":1}}]}`, "error 5"},
		{"nothing written", `{"jobs":[{"jobname":"x","write":{"io_bytes":0}}]}`, "wrote nothing"},
		{"no percentile", `{"jobs":[{"jobname":"x","write":{"io_bytes":4096,"clat_ns":{"percentile":{"50.000000":1}}}}]}`, "99.000000"},
		{"truncated", `{"jobs":[{"jobname"`, "decode"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseFio([]byte(tc.in))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("parseFio(%q) error = %v, want it to mention %q", tc.in, err, tc.want)
			}
		})
	}
}

func TestFioArgs(t *testing.T) {
	wl := DefaultWorkloads()[0]
	args := fioArgs(wl, "/dev/loop7", "io_uring", 2500*time.Millisecond, "/tmp/out.json")
	for _, want := range []string{
		"--filename=/dev/loop7", "--rw=randwrite", "--bs=4096", "--iodepth=32",
		"--ioengine=io_uring", "--direct=1", "--time_based", "--runtime=2500ms",
		"--lat_percentiles=1", "--output-format=json", "--output=/tmp/out.json",
	} {
		if !slices.Contains(args, want) {
			t.Errorf("fio args %q lack %q", args, want)
		}
	}
	if slices.ContainsFunc(args, func(a string) bool { return strings.HasPrefix(a, "--rate") }) {
		t.Errorf("fio args %q cap an uncapped workload", args)
	}
	capped := DefaultWorkloads()[3]
	if args := fioArgs(capped, "/dev/loop7", "io_uring", time.Second, "/tmp/o.json"); !slices.Contains(args, "--rate=400000000") {
		t.Errorf("fio args %q of %s lack its rate", args, capped.Name)
	}
}

// With lat_percentiles the p99 is of the total latency (submission
// included), which capture's submission-side work adds to.
func TestParseFioTotalLatency(t *testing.T) {
	doc := `{"jobs":[{"jobname":"w","error":0,"write":{"io_bytes":4096,"bw_bytes":4096,"iops":1,"runtime":1000,
		"clat_ns":{"mean":100,"percentile":{"99.000000":62208}},"lat_ns":{"percentile":{"99.000000":75264}}}}]}`
	r, err := parseFio([]byte(doc))
	if err != nil || r.P99Ns != 75264 {
		t.Fatalf("p99 = %v (%v), want the total latency's 75264", r.P99Ns, err)
	}
}
