package stream

import (
	"bytes"
	"net"
	"testing"
	"time"
)

// corkConn passes writes through until started, then holds them back
// until Flush. Close does not flush, returns at once even while a flush
// is blocked on a peer that does not read, and that flush fails; errors
// are sticky.
func TestCorkConn(t *testing.T) {
	a, b := net.Pipe()
	defer b.Close()
	c := &corkConn{Conn: a}
	read := func() chan []byte { // one read of the peer
		ch := make(chan []byte, 1)
		go func() {
			p := make([]byte, 1<<20)
			n, _ := b.Read(p)
			ch <- p[:n]
		}()
		return ch
	}
	r := read()
	if _, err := c.Write([]byte("hello")); err != nil || !bytes.Equal(<-r, []byte("hello")) {
		t.Fatal("write before start not passed through")
	}
	c.start()
	c.Write([]byte("one "))
	c.Write([]byte("two"))
	r = read()
	select {
	case p := <-r:
		t.Fatalf("%q written before Flush", p)
	case <-time.After(50 * time.Millisecond):
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if p := <-r; string(p) != "one two" {
		t.Fatalf("flushed %q, want one write of \"one two\"", p)
	}

	// The peer does not read: a flush blocks, and Close unblocks it.
	c.Write(make([]byte, 100<<10))
	flushed := make(chan error, 1)
	go func() { flushed <- c.Flush() }()
	time.Sleep(20 * time.Millisecond)
	closed := make(chan struct{})
	go func() { c.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(2 * time.Second):
		t.Fatal("Close blocked behind a stuck flush")
	}
	select {
	case err := <-flushed:
		if err == nil {
			t.Fatal("the stuck flush succeeded after Close")
		}
	case <-time.After(2 * time.Second):
		t.Fatal("the stuck flush did not fail after Close")
	}
	if _, err := c.Write([]byte("x")); err == nil {
		t.Fatal("a write succeeded after a failed flush")
	}
}
