package capture

import (
	"context"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/blockdev"
	"github.com/lifeboat-dr/lifeboat/internal/loopdev"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

// A barrier asked for while the reader works through a backlog goes out
// at the producer position it finds then, not once the ring reads empty:
// under steady writes that can be a whole ring later, and a drain holds
// back every record of its epoch until its barrier. Here the reader waits
// on a full queue with a backlog behind it; a barrier is asked for, the
// reader takes it in, and then more records come: the barrier must come
// before them.
func TestBarrierDuringBacklog(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireBTF(t)
	const size = 128 << 20
	d := loopdev.New(t, size, loopdev.Options{})
	bd, err := blockdev.Open(d.Path)
	if err != nil {
		t.Fatal(err)
	}
	kdev := bd.KernelDev()
	bd.Close()
	c, err := Load(Config{Devices: []Device{{ID: 0, KernelDev: kdev, Size: size, Mode: ModeData}}, RingBytes: 256 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	f, err := os.OpenFile(d.Path, os.O_WRONLY|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := blockdev.AlignedBuffer(BlockSize)
	write := func(n int, from int64) {
		t.Helper()
		for k := range n {
			if _, err := f.WriteAt(buf, (from+int64(k))*BlockSize%size); err != nil {
				t.Fatal(err)
			}
		}
	}
	queued := 1 << 14 // the reader's queue
	backlog := queued + 4000
	c.SetOverflow(0, false) // capture starts a device on the bitmap, until the agent's first drain
	write(backlog, 0)
	if k, err := c.Counters(); err != nil || k.Records != uint64(backlog) {
		t.Fatalf("%d records of %d writes (%v)", k.Records, backlog, err)
	}

	r := NewReader(c)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	defer func() {
		r.Stop()
		cancel()
		<-done
	}()
	// The reader fills its queue and waits for room, the backlog's rest
	// behind it.
	deadline := time.Now().Add(10 * time.Second)
	for r.RecordsRead.Load() < uint64(queued) {
		if time.Now().After(deadline) {
			t.Fatalf("the reader read %d records of %d", r.RecordsRead.Load(), backlog)
		}
		time.Sleep(time.Millisecond)
	}
	id := r.RequestBarrier()
	if _, ok := r.TryNext(); !ok { // room for one: the reader goes on, and takes the barrier in
		t.Fatal("no record queued")
	}
	// Two records read past the full queue: the second after the reader
	// looked for barriers again, once the one it waited to queue went in.
	for r.RecordsRead.Load() < uint64(queued)+2 {
		if time.Now().After(deadline) {
			t.Fatal("the reader did not go on")
		}
		time.Sleep(time.Millisecond)
	}
	write(3000, int64(backlog))

	records := 1
	for {
		it, err := r.Next(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if it.Barrier != 0 {
			if it.Barrier < id {
				continue
			}
			break
		}
		if !it.skip {
			records++
		}
	}
	if records < backlog {
		t.Fatalf("the barrier came after %d records, before the %d committed when it was asked for", records, backlog)
	}
	if records > backlog {
		t.Fatalf("the barrier came after %d records: the %d written after the reader took it in came first", records, records-backlog)
	}
}
