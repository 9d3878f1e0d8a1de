package perf

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Workload is one fio write job run against the loop device.
type Workload struct {
	// Name identifies the workload in reports, e.g. "randwrite-4k".
	Name string `json:"name"`
	// RW is fio's rw= value ("randwrite" or "write").
	RW string `json:"rw"`
	// BlockSize is fio's bs= value in bytes.
	BlockSize int64 `json:"block_size"`
	// IODepth is fio's iodepth= value.
	IODepth int `json:"iodepth"`
	// Rate caps the churn (fio's rate=, bytes/s); 0: as fast as it goes.
	Rate int64 `json:"rate_bytes_per_sec,omitempty"`
	// Variants limits the workload to these variants; nil: every one.
	Variants []Variant `json:"variants,omitempty"`
}

// runs reports whether the workload runs under variant v.
func (wl Workload) runs(v Variant) bool { return wl.Variants == nil || slices.Contains(wl.Variants, v) }

// OverflowRate is the churn below which data mode must not overflow.
const OverflowRate = 400e6

// DefaultWorkloads returns the standard capture workloads: 4 KiB random
// writes at queue depth 32 (IOPS-bound, stresses per-request capture cost)
// and 1 MiB sequential writes at queue depth 4 (bandwidth-bound, stresses
// data copying), each as fast as it goes with every variant, then capped
// at OverflowRate in data mode alone (the no-overflow goal).
func DefaultWorkloads() []Workload {
	data := []Variant{VariantData}
	return []Workload{
		{Name: "randwrite-4k", RW: "randwrite", BlockSize: 4 << 10, IODepth: 32},
		{Name: "seqwrite-1m", RW: "write", BlockSize: 1 << 20, IODepth: 4},
		{Name: "randwrite-4k-400MBps", RW: "randwrite", BlockSize: 4 << 10, IODepth: 32, Rate: OverflowRate, Variants: data},
		{Name: "seqwrite-1m-400MBps", RW: "write", BlockSize: 1 << 20, IODepth: 4, Rate: OverflowRate, Variants: data},
	}
}

// fioResult is the subset of fio's JSON output the harness reports.
type fioResult struct {
	IOPS      float64 // write IOPS
	BWBytes   float64 // write bandwidth, bytes/s
	IOBytes   int64   // bytes written
	RuntimeMs int64   // fio's own measured write runtime
	P99Ns     float64 // 99th percentile write latency, submission included (lat_ns; clat_ns without lat_percentiles)
	MeanNs    float64 // mean write completion latency
	UsrCPU    float64 // fio's user CPU, % of one core
	SysCPU    float64 // fio's system CPU, % of one core (includes in-kernel probe cost on the submit path)
}

// p99Key is how fio names the 99th percentile in lat_ns.percentile and
// clat_ns.percentile.
const p99Key = "99.000000"

// parseFio extracts jobs[0]'s write statistics from fio --output-format=json
// output. Anything before the first '{' is ignored because some fio versions
// print warnings ahead of the JSON document.
func parseFio(data []byte) (fioResult, error) {
	i := bytes.IndexByte(data, '{')
	if i < 0 {
		return fioResult{}, errors.New("fio output contains no JSON object")
	}
	var doc struct {
		Jobs []struct {
			JobName string  `json:"jobname"`
			Error   int     `json:"error"`
			UsrCPU  float64 `json:"usr_cpu"`
			SysCPU  float64 `json:"sys_cpu"`
			Write   struct {
				IOBytes int64   `json:"io_bytes"`
				BWBytes float64 `json:"bw_bytes"`
				IOPS    float64 `json:"iops"`
				Runtime int64   `json:"runtime"`
				ClatNs  struct {
					Mean       float64            `json:"mean"`
					Percentile map[string]float64 `json:"percentile"`
				} `json:"clat_ns"`
				// Total latency: with io_uring, a write issued inline
				// spends capture's submission-side work before fio
				// stamps its issue, so clat leaves it out.
				LatNs struct {
					Percentile map[string]float64 `json:"percentile"`
				} `json:"lat_ns"`
			} `json:"write"`
		} `json:"jobs"`
	}
	dec := json.NewDecoder(bytes.NewReader(data[i:]))
	if err := dec.Decode(&doc); err != nil {
		return fioResult{}, fmt.Errorf("decode fio JSON: %w", err)
	}
	if len(doc.Jobs) == 0 {
		return fioResult{}, errors.New("fio JSON has no jobs")
	}
	j := doc.Jobs[0]
	if j.Error != 0 {
		return fioResult{}, fmt.Errorf("fio job %q failed with error %d", j.JobName, j.Error)
	}
	w := j.Write
	if w.IOBytes == 0 {
		return fioResult{}, fmt.Errorf("fio job %q wrote nothing", j.JobName)
	}
	p99, ok := w.LatNs.Percentile[p99Key]
	if !ok {
		p99, ok = w.ClatNs.Percentile[p99Key]
	}
	if !ok {
		return fioResult{}, fmt.Errorf("fio job %q has no write clat_ns percentile %s", j.JobName, p99Key)
	}
	return fioResult{
		IOPS:      w.IOPS,
		BWBytes:   w.BWBytes,
		IOBytes:   w.IOBytes,
		RuntimeMs: w.Runtime,
		P99Ns:     p99,
		MeanNs:    w.ClatNs.Mean,
		UsrCPU:    j.UsrCPU,
		SysCPU:    j.SysCPU,
	}, nil
}

// fioArgs builds the fio command line for one workload run. The JSON goes to
// a file rather than stdout so fio's own warnings cannot corrupt it.
func fioArgs(wl Workload, device, engine string, runtime time.Duration, out string) []string {
	args := []string{
		"--name=" + wl.Name,
		"--filename=" + device,
		"--rw=" + wl.RW,
		"--bs=" + strconv.FormatInt(wl.BlockSize, 10),
		"--iodepth=" + strconv.Itoa(wl.IODepth),
		"--ioengine=" + engine,
		"--direct=1",
		"--numjobs=1",
		// Jobs as threads, not forked processes (which call setsid): killing
		// fio on cancellation must stop the writes and release the device
		// before it is detached.
		"--thread",
		"--time_based",
		"--runtime=" + strconv.FormatInt(runtime.Milliseconds(), 10) + "ms",
		// The random map costs fio CPU and memory and is irrelevant for
		// throughput measurement.
		"--norandommap",
		"--randrepeat=0",
		"--lat_percentiles=1",
		"--output-format=json",
		"--output=" + out,
	}
	if wl.Rate > 0 {
		args = append(args, "--rate="+strconv.FormatInt(wl.Rate, 10))
	}
	return args
}

// runFio runs one workload and parses its result. tmpDir receives the JSON
// output file.
func runFio(ctx context.Context, fio string, wl Workload, device, engine string, runtime time.Duration, tmpDir string) (fioResult, error) {
	out := filepath.Join(tmpDir, "fio-"+wl.Name+".json")
	defer os.Remove(out)
	cmd := exec.CommandContext(ctx, fio, fioArgs(wl, device, engine, runtime, out)...)
	// Own process group: a terminal ^C reaches only the harness, which then
	// cancels fio via ctx. (Killing fio's group would not help: job
	// processes call setsid, hence --thread in fioArgs.)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.WaitDelay = 5 * time.Second
	var stderr bytes.Buffer
	cmd.Stdout = &stderr // fio prints nothing useful on stdout with --output; keep it for errors
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			return fioResult{}, ctx.Err()
		}
		return fioResult{}, fmt.Errorf("fio %s on %s: %w: %s", wl.Name, device, err, strings.TrimSpace(stderr.String()))
	}
	data, err := os.ReadFile(out)
	if err != nil {
		return fioResult{}, fmt.Errorf("read fio output: %w", err)
	}
	res, err := parseFio(data)
	if err != nil {
		return fioResult{}, fmt.Errorf("fio %s on %s: %w", wl.Name, device, err)
	}
	return res, nil
}

// fioVersion returns fio's self-reported version, e.g. "fio-3.33".
func fioVersion(ctx context.Context, fio string) string {
	out, err := exec.CommandContext(ctx, fio, "--version").Output()
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(out))
}
