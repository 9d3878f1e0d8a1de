package processserver

import "sync/atomic"

// hotLimit bounds the sealed segments kept in memory for their upload
// and apply.
const hotLimit = 128 << 20

// hotSeg is a sealed segment kept in memory until applied, so that its
// upload and the applier need not read it back from the cache disks. Its
// bytes are where the segment was sealed (no copy is made). Users hold a
// reference while they read them (acquire under the machine's lock, where
// the entry is known to hold it); the last release calls free, which hands
// the buffer back for another segment.
type hotSeg struct {
	b    []byte
	size int64        // memory held: b's capacity
	refs atomic.Int32 // the segment entry's own plus its readers'
	free func()       // nil: the GC takes the buffer
}

// acquire takes a reference for a reader; nil-safe.
func (h *hotSeg) acquire() *hotSeg {
	if h != nil {
		h.refs.Add(1)
	}
	return h
}

// release drops a reference; the last one frees the buffer. nil-safe.
func (h *hotSeg) release() {
	if h == nil {
		return
	}
	if n := h.refs.Add(-1); n == 0 {
		h.b = nil
		if h.free != nil {
			h.free()
		}
	} else if n < 0 {
		panic("processserver: hot segment released twice")
	}
}

// newHot keeps the sealed segment b in memory if hotLimit allows, which
// counts the memory b holds (its capacity); free (if not nil) runs once
// nothing reads b any more. nil when over the limit: the caller keeps b.
func (s *Server) newHot(b []byte, free func()) *hotSeg {
	n := int64(cap(b))
	if s.hotBytes.Add(n) > hotLimit {
		s.hotBytes.Add(-n)
		return nil
	}
	h := &hotSeg{b: b, size: n, free: free}
	h.refs.Store(1)
	return h
}

// dropHot ends the segment entry's hold on h (nil is ignored): its bytes
// leave the hot budget now, its buffer once the last reader is done.
func (s *Server) dropHot(h *hotSeg) {
	if h == nil {
		return
	}
	s.hotBytes.Add(-h.size)
	h.release()
}
