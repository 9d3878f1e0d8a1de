package channel

import (
	"bytes"
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

var (
	fuzzKey = keys{bytes.Repeat([]byte{7}, 32), bytes.Repeat([]byte{9}, 12)}
	noKey   = keys{make([]byte, 32), make([]byte, 12)}
)

// sealed returns the records of plaintexts as a writer with fuzzKey
// writes them.
func sealed(t testing.TB, plaintexts ...[]byte) []byte {
	sc := &streamConn{}
	c, err := newConn(sc, nil, nil, noKey, fuzzKey)
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
		c, err := newConn(sc, nil, bufioReader(sc), fuzzKey, noKey)
		if err != nil {
			t.Fatal(err)
		}
		var got [][]byte
		for {
			p, err := c.ReadRecord(make([]byte, 0, 64), nil)
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
