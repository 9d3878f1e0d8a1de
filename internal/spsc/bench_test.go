package spsc

import (
	"context"
	"io"
	"testing"
)

// event approximates a captured write record.
type event struct {
	Seq, Off uint64
	Len, Dev uint32
}

const (
	benchCap   = 1024
	benchBatch = 64
)

// Each benchmark moves b.N events from one goroutine to another, so ns/op
// is the cost per item, end to end.

func BenchmarkRingBatch64(b *testing.B) {
	r := New[event](benchCap)
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	go func() {
		var seq uint64
		for seq < uint64(b.N) {
			a, c := r.Claim(min(benchBatch, b.N-int(seq)))
			if len(a)+len(c) == 0 {
				_ = r.WaitSpace(ctx)
				continue
			}
			for i := range a {
				a[i] = event{Seq: seq}
				seq++
			}
			for i := range c {
				c[i] = event{Seq: seq}
				seq++
			}
			r.Publish(len(a) + len(c))
		}
		r.Close()
	}()
	var got, sum uint64
	for {
		a, c := r.Peek(benchBatch)
		if len(a)+len(c) == 0 {
			if r.Wait(ctx) == io.EOF {
				break
			}
			continue
		}
		// Touch every element, as a real consumer would.
		for _, e := range a {
			sum += e.Seq
		}
		for _, e := range c {
			sum += e.Seq
		}
		got += uint64(len(a) + len(c))
		r.Release(len(a) + len(c))
	}
	if got != uint64(b.N) || sum != wantSum(b.N) {
		b.Fatalf("received %d of %d (sum %d)", got, b.N, sum)
	}
}

func BenchmarkRingSingle(b *testing.B) {
	r := New[event](benchCap)
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	go func() {
		for i := 0; i < b.N; {
			if r.TryPush(event{Seq: uint64(i)}) {
				i++
				continue
			}
			_ = r.WaitSpace(ctx)
		}
		r.Close()
	}()
	var got int
	var sum uint64
	for {
		if e, ok := r.TryPop(); ok {
			sum += e.Seq
			got++
			continue
		}
		if r.Wait(ctx) == io.EOF {
			break
		}
	}
	if got != b.N || sum != wantSum(b.N) {
		b.Fatalf("received %d of %d (sum %d)", got, b.N, sum)
	}
}

func BenchmarkChannel(b *testing.B) {
	ch := make(chan event, benchCap)
	b.ReportAllocs()
	b.ResetTimer()
	go func() {
		for i := 0; i < b.N; i++ {
			ch <- event{Seq: uint64(i)}
		}
		close(ch)
	}()
	var got int
	var sum uint64
	for e := range ch {
		sum += e.Seq
		got++
	}
	if got != b.N || sum != wantSum(b.N) {
		b.Fatalf("received %d of %d (sum %d)", got, b.N, sum)
	}
}

func wantSum(n int) uint64 { return uint64(n) * uint64(n-1) / 2 }
