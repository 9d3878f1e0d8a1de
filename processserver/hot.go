package processserver

import "sync/atomic"

// hotLimit bounds the sealed segments kept in memory for their upload
// and apply.
const hotLimit = 128 << 20

// hotSeg is a sealed segment kept in memory until applied, so that its
// upload and the applier need not read it back from the cache disks. Its
// buffer is the one the segment was sealed into: no copy is made. Users
// hold a reference while they read it (acquire under the machine's lock,
// where the entry is known to hold it); the last release hands the buffer
// back for the next segment to be sealed into.
type hotSeg struct {
	b    []byte
	refs atomic.Int32 // the segment entry's own plus its readers'
	s    *Server
}

// acquire takes a reference for a reader; nil-safe.
func (h *hotSeg) acquire() *hotSeg {
	if h != nil {
		h.refs.Add(1)
	}
	return h
}

// release drops a reference; the last one recycles the buffer. nil-safe.
func (h *hotSeg) release() {
	if h == nil {
		return
	}
	if n := h.refs.Add(-1); n == 0 {
		h.s.putSealed(h.b)
		h.b = nil
	} else if n < 0 {
		panic("processserver: hot segment released twice")
	}
}

// newHot keeps sealed in memory if hotLimit allows, taking ownership of
// it; nil when it does not (the caller keeps sealed).
func (s *Server) newHot(sealed []byte) *hotSeg {
	n := int64(len(sealed))
	if s.hotBytes.Add(n) > hotLimit {
		s.hotBytes.Add(-n)
		return nil
	}
	h := &hotSeg{b: sealed, s: s}
	h.refs.Store(1)
	return h
}

// dropHot ends the segment entry's hold on h (nil is ignored): its bytes
// leave the hot budget now, its buffer once the last reader is done.
func (s *Server) dropHot(h *hotSeg) {
	if h == nil {
		return
	}
	s.hotBytes.Add(-int64(len(h.b)))
	h.release()
}

// getSealed returns a recycled buffer to seal a segment into (empty, with
// the capacity of the last one), or nil.
func (s *Server) getSealed() []byte {
	select {
	case b := <-s.freeSealed:
		return b[:0]
	default:
		return nil
	}
}

func (s *Server) putSealed(b []byte) {
	select {
	case s.freeSealed <- b:
	default: // enough spare buffers: let the GC have it
	}
}
