package wire

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"testing"
)

// oneMiBBatch builds a batch of about 1 MiB of writes of recSize bytes.
func oneMiBBatch(b *testing.B, recSize int) *BatchBuilder {
	data := make([]byte, 1<<20)
	for i := range data {
		data[i] = byte(i * 13)
	}
	var bb BatchBuilder
	for i := 0; (i+1)*recSize <= len(data); i++ {
		chunk := data[i*recSize : (i+1)*recSize]
		if err := bb.Add(Record{Seq: uint64(i + 1), Op: OpWrite, Offset: uint64(i * recSize), Length: uint32(recSize), Data: chunk}); err != nil {
			b.Fatal(err)
		}
	}
	return &bb
}

// BenchmarkBatchRoundTrip writes a ~1 MiB batch and reads, verifies and
// iterates it, through memory: framing, CRC and copying cost only.
func BenchmarkBatchRoundTrip(b *testing.B) {
	for _, recSize := range []int{4 << 10, 64 << 10} {
		b.Run(fmt.Sprintf("records=%dKiB", recSize>>10), func(b *testing.B) {
			bb := oneMiBBatch(b, recSize)
			var buf bytes.Buffer
			w, r := NewWriter(&buf), NewReader(&buf, 0)
			b.SetBytes(int64(bb.Len()))
			b.ReportAllocs()
			for b.Loop() {
				if err := w.WriteBatch(bb); err != nil {
					b.Fatal(err)
				}
				f, err := r.Next()
				if err != nil {
					b.Fatal(err)
				}
				batch, err := DecodeBatch(f.Payload)
				if err != nil {
					b.Fatal(err)
				}
				n := 0
				for it := batch.Records(); it.Next(); {
					n += len(it.Record().Data)
				}
				if n != recSize*bb.Count() {
					b.Fatalf("read %d data bytes", n)
				}
			}
		})
	}
}

// BenchmarkBatchTCP streams ~1 MiB batches over loopback TCP (the writev
// path) to a reader in another goroutine.
func BenchmarkBatchTCP(b *testing.B) {
	for _, recSize := range []int{4 << 10, 64 << 10} {
		b.Run(fmt.Sprintf("records=%dKiB", recSize>>10), func(b *testing.B) {
			bb := oneMiBBatch(b, recSize)
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				b.Fatal(err)
			}
			defer ln.Close()
			done := make(chan error, 1)
			go func() {
				c, err := ln.Accept()
				if err != nil {
					done <- err
					return
				}
				defer c.Close()
				r := NewReader(c, 0)
				for {
					f, err := r.Next()
					if err == io.EOF {
						done <- nil
						return
					}
					if err != nil {
						done <- err
						return
					}
					if _, err := DecodeBatch(f.Payload); err != nil {
						done <- err
						return
					}
				}
			}()
			c, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				b.Fatal(err)
			}
			w := NewWriter(c)
			b.SetBytes(int64(bb.Len()))
			b.ReportAllocs()
			for b.Loop() {
				if err := w.WriteBatch(bb); err != nil {
					b.Fatal(err)
				}
			}
			c.Close()
			if err := <-done; err != nil {
				b.Fatal(err)
			}
		})
	}
}
