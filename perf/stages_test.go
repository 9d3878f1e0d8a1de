package perf

import (
	"bytes"
	"context"
	"math"
	"runtime"
	"runtime/pprof"
	"testing"
	"time"

	"github.com/google/pprof/profile"
	"golang.org/x/sys/unix"

	"github.com/lifeboat-dr/lifeboat/internal/stage"
)

// TestCPUByStage profiles real work under two stage labels and one
// unlabelled goroutine, and checks that each lands in its bucket.
func TestCPUByStage(t *testing.T) {
	var buf bytes.Buffer
	if err := pprof.StartCPUProfile(&buf); err != nil {
		t.Fatalf("start CPU profile: %v", err)
	}
	// spin burns d of its own thread's CPU time, not of wall time: on a
	// busy machine (CI runs packages in parallel on two cores) a wall-time
	// spin gets a fraction of it.
	spin := func(d time.Duration) {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		start := threadCPU(t)
		x := 1.0
		for threadCPU(t)-start < d {
			for range 1000 {
				x = math.Sqrt(x + 1)
			}
		}
		_ = x
	}
	done := make(chan struct{}, 3)
	go stage.Do(context.Background(), stage.Ingest, func(context.Context) { spin(300 * time.Millisecond); done <- struct{}{} })
	go stage.Do(context.Background(), stage.Apply, func(ctx context.Context) {
		// Goroutines started inside inherit the label.
		inner := make(chan struct{})
		go func() { spin(300 * time.Millisecond); close(inner) }()
		<-inner
		done <- struct{}{}
	})
	go func() { spin(100 * time.Millisecond); done <- struct{}{} }()
	for range 3 {
		<-done
	}
	pprof.StopCPUProfile()
	p, err := profile.Parse(&buf)
	if err != nil {
		t.Fatal(err)
	}
	cpu, err := cpuByStage(p)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("CPU by stage: %v", cpu)
	for _, s := range []string{stage.Ingest, stage.Apply} {
		if cpu[s] < 0.1 || cpu[s] > 0.6 {
			t.Errorf("stage %s: %.3f s of CPU, want about 0.3", s, cpu[s])
		}
	}
	if cpu[StageOther] > cpu[stage.Ingest] {
		t.Errorf("unlabelled %.3f s > ingest %.3f s", cpu[StageOther], cpu[stage.Ingest])
	}
	if cpu[stage.Prepare] != 0 {
		t.Errorf("prepare got %.3f s but nothing ran under it", cpu[stage.Prepare])
	}
}

// threadCPU is the CPU time the calling OS thread has used.
func threadCPU(t *testing.T) time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_THREAD, &ru); err != nil {
		t.Errorf("getrusage: %v", err)
		return time.Hour
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
