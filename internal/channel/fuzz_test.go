package channel

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"testing"
)

// streamConn reads a fixed stream and collects what is written.
type streamConn struct {
	net.Conn // nil: only Read and Write are used
	r        io.Reader
	w        bytes.Buffer
}

func (c *streamConn) Read(p []byte) (int, error)  { return c.r.Read(p) }
func (c *streamConn) Write(p []byte) (int, error) { return c.w.Write(p) }

// testExport stands for a TLS session's exporter: the same keys on both
// ends, distinct per context (epoch).
func testExport(label string, context []byte, n int) ([]byte, error) {
	h := sha256.Sum256(append([]byte(label+"\x00"), context...))
	return bytes.Repeat(h[:], n/len(h)+1)[:n], nil
}

// sealed returns the records of plaintexts as a client writes them.
func sealed(t testing.TB, plaintexts ...[]byte) []byte {
	sc := &streamConn{}
	c, err := newConn(sc, nil, nil, testExport, false)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range plaintexts {
		if err := c.AppendRecord(p); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	return sc.w.Bytes()
}

// TestRekey: records keep flowing both ways across key epochs, and each
// epoch's key is another (a record sealed under the previous one fails).
func TestRekey(t *testing.T) {
	defer func(b uint64) { rekeyBytes = b }(rekeyBytes)
	rekeyBytes = 10 << 10
	var plaintexts [][]byte
	for i := range 40 {
		plaintexts = append(plaintexts, bytes.Repeat([]byte{byte(i)}, 1000+i*37))
	}
	stream := sealed(t, plaintexts...)
	sc := &streamConn{r: bytes.NewReader(stream)}
	c, err := newConn(sc, nil, bufioReader(sc), testExport, true)
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range plaintexts {
		p, err := c.ReadRecord(nil, -1, nil)
		if err != nil || !bytes.Equal(p, want) {
			t.Fatalf("record %d: %v", i, err)
		}
	}
	if c.in.epoch < 3 {
		t.Fatalf("epoch %d after %d bytes, want at least 3 rekeys", c.in.epoch, len(stream))
	}
	// A reader that does not rekey cannot read past the first epoch.
	rekeyBytes = 1 << 62
	sc = &streamConn{r: bytes.NewReader(stream)}
	c, _ = newConn(sc, nil, bufioReader(sc), testExport, true)
	var err2 error
	for range plaintexts {
		if _, err2 = c.ReadRecord(nil, -1, nil); err2 != nil {
			break
		}
	}
	if !errors.Is(err2, ErrAuth) {
		t.Fatalf("reader without rekeying: %v, want an authentication failure", err2)
	}
}

// FuzzReadRecord: whatever arrives, ReadRecord returns only records that
// a holder of the key sealed, in their order (resealing what it returned
// gives back the bytes it consumed), and otherwise a clean error.
func FuzzReadRecord(f *testing.F) {
	f.Add(sealed(f, []byte("hello")))
	f.Add(sealed(f, nil, []byte("a"), bytes.Repeat([]byte{1}, 1000)))
	f.Add(sealed(f, bytes.Repeat([]byte{2}, 5000))[:3000])
	f.Add([]byte{0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x2a})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, data []byte) {
		sc := &streamConn{r: bytes.NewReader(data)}
		c, err := newConn(sc, nil, bufioReader(sc), testExport, true)
		if err != nil {
			t.Fatal(err)
		}
		var got [][]byte
		for {
			p, err := c.ReadRecord(make([]byte, 0, 64), -1, nil)
			if err != nil {
				if err != io.EOF && !errors.Is(err, ErrAuth) && !errors.Is(err, io.ErrUnexpectedEOF) {
					t.Fatalf("error neither EOF, truncation nor authentication: %v", err)
				}
				if err == io.EOF {
					if want := sealed(t, got...); !bytes.Equal(want, data) {
						t.Fatalf("clean end after %d records that reseal to other bytes", len(got))
					}
				}
				break
			}
			got = append(got, bytes.Clone(p))
		}
		if len(got) > 0 {
			if want := sealed(t, got...); !bytes.HasPrefix(data, want) {
				t.Fatalf("%d records returned that are not what the stream began with", len(got))
			}
		}
	})
}

// TestClaimedLengthNotTrusted: a record that claims MaxRecord bytes but
// stops after 100 KiB makes the reader hold about twice that, not the
// claim.
func TestClaimedLengthNotTrusted(t *testing.T) {
	stream := binary.BigEndian.AppendUint32(nil, MaxRecord)
	stream = append(stream, make([]byte, 100<<10)...)
	sc := &streamConn{r: bytes.NewReader(stream)}
	c, err := newConn(sc, nil, bufioReader(sc), testExport, true)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.ReadRecord(nil, -1, nil); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("%v, want the stream cut inside the record", err)
	}
	if cap(c.rbuf) > 2*(100<<10)+growStep {
		t.Fatalf("reader holds %d bytes for a record cut at 100 KiB", cap(c.rbuf))
	}
}
