package stream

import (
	"bytes"
	"net"
	"testing"
	"time"
)

// corkConn passes writes through until started, then holds them back
// until Flush (or until full), and Close flushes first, unless a write is
// blocked: then Close returns at once and the write fails.
func TestCorkConn(t *testing.T) {
	a, b := net.Pipe()
	defer b.Close()
	c := &corkConn{Conn: a}
	got := make(chan []byte, 16)
	go func() {
		for {
			p := make([]byte, 1<<20)
			n, err := b.Read(p)
			if err != nil {
				close(got)
				return
			}
			got <- p[:n]
		}
	}()
	if _, err := c.Write([]byte("hello")); err != nil || !bytes.Equal(<-got, []byte("hello")) {
		t.Fatal("write before start not passed through")
	}
	c.start()
	c.Write([]byte("one "))
	c.Write([]byte("two"))
	select {
	case p := <-got:
		t.Fatalf("%q written before Flush", p)
	case <-time.After(50 * time.Millisecond):
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if p := <-got; string(p) != "one two" {
		t.Fatalf("flushed %q, want one write of \"one two\"", p)
	}
	c.Write([]byte("bye"))
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if p := <-got; string(p) != "bye" {
		t.Fatalf("close flushed %q", p)
	}

	// A write blocked on a peer that does not read: Close unblocks it.
	x, y := net.Pipe()
	defer y.Close()
	c = &corkConn{Conn: x}
	c.start()
	errc := make(chan error, 1)
	go func() {
		_, err := c.Write(make([]byte, 2*corkSize)) // larger than the buffer: written through
		errc <- err
	}()
	time.Sleep(20 * time.Millisecond)
	done := make(chan struct{})
	go func() { c.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		t.Fatal("Close blocked behind a stuck write")
	}
	if err := <-errc; err == nil {
		t.Fatal("the stuck write succeeded after Close")
	}
}
