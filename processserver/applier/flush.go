package applier

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
)

// How one flush turns queued records into page blob calls:
//
//  1. resolve: overlapping records are settled in memory, the later
//     sequence winning byte by byte, giving sorted, disjoint fragments.
//     Every call below then touches pages no other call of the flush
//     touches, so the calls can run in parallel in any order and still
//     leave the blob as applying the records in sequence order would.
//  2. plan: whole pages that only zero/discard records cover become Clear
//     Pages; everything else is grouped into page-aligned chunks, adjacent
//     fragments coalesced. Bytes of a chunk's pages that no fragment covers
//     (the edges of unaligned writes) are read back from the blob first.
//  3. write: chunks go out as Put Page calls of at most 4 MiB (runs of
//     ≥ 64 KiB of zero pages are cleared instead: sparse and cheaper),
//     Parallelism calls at a time.

const (
	pageSize = blobstore.PageSize
	// zeroRunMin is the shortest run of zero pages inside written data
	// that is cleared rather than written.
	zeroRunMin = 64 << 10
	// maxChunk bounds the buffer of one chunk when coalescing fragments
	// that do not share a page (sharing ones must stay in one chunk).
	maxChunk = 4 * blobstore.MaxPutPage
)

func alignDown(x int64) int64 { return x &^ (pageSize - 1) }
func alignUp(x int64) int64   { return (x + pageSize - 1) &^ (pageSize - 1) }

// pendingOp is a queued record: [off, end) gets data, or zeros if nil.
type pendingOp struct {
	off, end int64
	data     []byte
}

// frag is a settled byte range; data nil means zeros.
type frag struct {
	off, end int64
	data     []byte
}

// resolver holds scratch space reused across flushes.
type resolver struct {
	frags  []frag
	bounds []int64
	order  []int32
	heap   []int32
	data   []frag
	chunks []chunk
	clears []blobstore.PageRange
	reads  []blobstore.PageRange
	jobs   []job
	arena  []byte
}

// resolve settles ops (in sequence order) into r.frags: sorted, disjoint,
// later ops winning, adjacent zero ranges merged.
func (r *resolver) resolve(ops []pendingOp) []frag {
	out := r.frags[:0]
	disjoint := true
	for i := 1; i < len(ops); i++ {
		if ops[i].off < ops[i-1].end {
			disjoint = false
			break
		}
	}
	if disjoint {
		// The common case: sequential or scattered non-overlapping writes.
		for _, o := range ops {
			out = append(out, frag(o))
		}
	} else {
		out = r.sweep(ops, out)
	}
	// Merge adjacent zero ranges so that their whole pages become one
	// clear, even when they were split between records mid-page.
	merged := out[:0]
	for _, f := range out {
		if n := len(merged); n > 0 && f.data == nil && merged[n-1].data == nil && merged[n-1].end == f.off {
			merged[n-1].end = f.end
			continue
		}
		merged = append(merged, f)
	}
	r.frags = merged
	return merged
}

// sweep computes, for every elementary interval between op boundaries,
// the op with the highest index (latest sequence) covering it.
func (r *resolver) sweep(ops []pendingOp, out []frag) []frag {
	bounds := r.bounds[:0]
	order := r.order[:0]
	for i, o := range ops {
		bounds = append(bounds, o.off, o.end)
		order = append(order, int32(i))
	}
	slices.Sort(bounds)
	bounds = slices.Compact(bounds)
	slices.SortStableFunc(order, func(a, b int32) int {
		switch {
		case ops[a].off < ops[b].off:
			return -1
		case ops[a].off > ops[b].off:
			return 1
		}
		return 0
	})
	h := r.heap[:0]
	last := int32(-1)
	j := 0
	for b := 0; b+1 < len(bounds); b++ {
		x, y := bounds[b], bounds[b+1]
		for j < len(order) && ops[order[j]].off <= x {
			h = heapPush(h, order[j])
			j++
		}
		// Ops with a higher index than the top that have ended were popped
		// when they were the top, so only the top needs checking.
		for len(h) > 0 && ops[h[0]].end <= x {
			h = heapPop(h)
		}
		if len(h) == 0 {
			last = -1
			continue
		}
		w := h[0]
		o := &ops[w]
		if n := len(out); n > 0 && last == w && out[n-1].end == x {
			out[n-1].end = y
			if o.data != nil {
				out[n-1].data = o.data[out[n-1].off-o.off : y-o.off]
			}
			continue
		}
		f := frag{off: x, end: y}
		if o.data != nil {
			f.data = o.data[x-o.off : y-o.off]
		}
		out = append(out, f)
		last = w
	}
	r.bounds, r.order, r.heap = bounds, order, h[:0]
	return out
}

// heapPush and heapPop keep a max-heap of op indices.
func heapPush(h []int32, v int32) []int32 {
	h = append(h, v)
	for i := len(h) - 1; i > 0; {
		p := (i - 1) / 2
		if h[p] >= h[i] {
			break
		}
		h[p], h[i] = h[i], h[p]
		i = p
	}
	return h
}

func heapPop(h []int32) []int32 {
	n := len(h) - 1
	h[0] = h[n]
	h = h[:n]
	for i := 0; ; {
		l, m := 2*i+1, i
		if l < n && h[l] > h[m] {
			m = l
		}
		if l+1 < n && h[l+1] > h[m] {
			m = l + 1
		}
		if m == i {
			break
		}
		h[i], h[m] = h[m], h[i]
		i = m
	}
	return h
}

// chunk is a page-aligned range written as a whole.
type chunk struct {
	off, end int64
	frags    []frag // within [off, end), sorted
	buf      []byte // the content to write
}

// job is one page blob call.
type job struct {
	clear bool
	off   int64
	n     int64
	data  []byte
}

// flushStats counts the page blob calls of one flush.
type flushStats struct {
	writes, clears, reads int
	bytes                 int64
}

// flush applies ops to page blob name with at most workers concurrent
// calls. On error, some calls may have been made: the blob then holds a
// mix of old and new pages, which re-applying the same records (in
// sequence order, from any earlier state) repairs.
func (r *resolver) flush(ctx context.Context, store blobstore.Store, name string, ops []pendingOp, workers int) (flushStats, error) {
	var st flushStats
	if len(ops) == 0 {
		return st, nil
	}
	frags := r.resolve(ops)

	// Plan: interior whole pages of zero fragments are cleared; the rest
	// goes into chunks.
	clears := r.clears[:0]
	data := r.data[:0]
	for _, f := range frags {
		if f.data == nil {
			if a, b := alignUp(f.off), alignDown(f.end); a < b {
				if f.off < a {
					data = append(data, frag{off: f.off, end: a})
				}
				clears = append(clears, blobstore.PageRange{Offset: a, Length: b - a})
				if b < f.end {
					data = append(data, frag{off: b, end: f.end})
				}
				continue
			}
		}
		data = append(data, f)
	}
	chunks := r.chunks[:0]
	for i, f := range data {
		ps, pe := alignDown(f.off), alignUp(f.end)
		if n := len(chunks); n > 0 {
			c := &chunks[n-1]
			if ps < c.end || (ps == c.end && pe-c.off <= maxChunk) {
				c.end = max(c.end, pe)
				c.frags = data[i-len(c.frags) : i+1]
				continue
			}
		}
		chunks = append(chunks, chunk{off: ps, end: pe, frags: data[i : i+1]})
	}

	// Buffers: a single page-aligned data fragment is written from the
	// record itself; anything else is assembled in the arena.
	need := 0
	for i := range chunks {
		c := &chunks[i]
		if len(c.frags) == 1 && c.frags[0].data != nil && c.frags[0].off == c.off && c.frags[0].end == c.end {
			c.buf = c.frags[0].data
			continue
		}
		need += int(c.end - c.off)
	}
	if cap(r.arena) < need {
		r.arena = make([]byte, need)
	}
	arena := r.arena[:need]
	reads := r.reads[:0]
	for i := range chunks {
		c := &chunks[i]
		if c.buf != nil {
			continue
		}
		c.buf, arena = arena[:c.end-c.off], arena[c.end-c.off:]
		clear(c.buf)
		// Pages partly covered need their other bytes from the blob.
		at := c.off
		for _, f := range c.frags {
			if f.off > at {
				reads = appendRead(reads, alignDown(at), alignUp(f.off))
			}
			at = f.end
		}
		if at < c.end {
			reads = appendRead(reads, alignDown(at), c.end)
		}
	}
	r.clears, r.data, r.chunks, r.reads = clears, data, chunks, reads

	chunkOf := func(off int64) *chunk {
		i, _ := slices.BinarySearchFunc(chunks, off, func(c chunk, off int64) int {
			switch {
			case c.end <= off:
				return -1
			case c.off > off:
				return 1
			}
			return 0
		})
		return &chunks[i]
	}
	if err := parallel(ctx, workers, len(reads), func(ctx context.Context, i int) error {
		rd := reads[i]
		c := chunkOf(rd.Offset)
		if err := store.ReadPages(ctx, name, "", rd.Offset, c.buf[rd.Offset-c.off:rd.End()-c.off]); err != nil {
			return fmt.Errorf("read back pages [%d, %d) of %s: %w", rd.Offset, rd.End(), name, err)
		}
		return nil
	}); err != nil {
		return st, err
	}
	st.reads = len(reads)
	for i := range chunks {
		c := &chunks[i]
		for _, f := range c.frags {
			dst := c.buf[f.off-c.off : f.end-c.off]
			if f.data == nil {
				clear(dst)
			} else if &f.data[0] != &dst[0] {
				copy(dst, f.data)
			}
		}
	}

	jobs := r.jobs[:0]
	for _, cr := range clears {
		jobs = append(jobs, job{clear: true, off: cr.Offset, n: cr.Length})
	}
	for i := range chunks {
		jobs = appendWrites(jobs, chunks[i].off, chunks[i].buf)
	}
	r.jobs = jobs
	for _, j := range jobs {
		if j.clear {
			st.clears++
		} else {
			st.writes++
			st.bytes += j.n
		}
	}
	err := parallel(ctx, workers, len(jobs), func(ctx context.Context, i int) error {
		j := jobs[i]
		if j.clear {
			if err := store.ClearPages(ctx, name, j.off, j.n); err != nil {
				return fmt.Errorf("clear pages [%d, %d) of %s: %w", j.off, j.off+j.n, name, err)
			}
			return nil
		}
		if err := store.WritePages(ctx, name, j.off, j.data); err != nil {
			return fmt.Errorf("write pages [%d, %d) of %s: %w", j.off, j.off+j.n, name, err)
		}
		return nil
	})
	// Drop references to record data (it aliases the segment plaintext).
	clear(r.frags)
	clear(r.data)
	clear(r.chunks)
	clear(r.jobs)
	return st, err
}

// appendRead adds the page range [a, b), merging it with the previous one
// when they overlap (two gaps in one page).
func appendRead(rs []blobstore.PageRange, a, b int64) []blobstore.PageRange {
	if n := len(rs); n > 0 && a < rs[n-1].End() {
		rs[n-1].Length = max(rs[n-1].End(), b) - rs[n-1].Offset
		return rs
	}
	return append(rs, blobstore.PageRange{Offset: a, Length: b - a})
}

var zeroPage [pageSize]byte

// appendWrites splits buf (page aligned, at off) into Put Page calls of at
// most MaxPutPage bytes, clearing runs of at least zeroRunMin zero bytes.
func appendWrites(jobs []job, off int64, buf []byte) []job {
	start := 0 // start of the pending write run
	for p := 0; p < len(buf); {
		if !bytes.Equal(buf[p:p+pageSize], zeroPage[:]) {
			p += pageSize
			continue
		}
		z := p
		for z < len(buf) && bytes.Equal(buf[z:z+pageSize], zeroPage[:]) {
			z += pageSize
		}
		if z-p >= zeroRunMin {
			jobs = appendPuts(jobs, off+int64(start), buf[start:p])
			jobs = append(jobs, job{clear: true, off: off + int64(p), n: int64(z - p)})
			start = z
		}
		p = z
	}
	return appendPuts(jobs, off+int64(start), buf[start:])
}

func appendPuts(jobs []job, off int64, buf []byte) []job {
	for len(buf) > 0 {
		n := min(len(buf), blobstore.MaxPutPage)
		jobs = append(jobs, job{off: off, n: int64(n), data: buf[:n]})
		off, buf = off+int64(n), buf[n:]
	}
	return jobs
}

// parallel calls fn(ctx, i) for i in [0, n) with at most workers calls at
// a time. The first error cancels the others and is returned.
func parallel(ctx context.Context, workers, n int, fn func(ctx context.Context, i int) error) error {
	if n == 0 {
		return nil
	}
	if workers <= 0 {
		workers = 1
	}
	if workers == 1 || n == 1 {
		for i := range n {
			if err := fn(ctx, i); err != nil {
				return err
			}
		}
		return nil
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var wg sync.WaitGroup
	next := make(chan int)
	for range min(workers, n) {
		wg.Go(func() {
			for i := range next {
				if err := fn(ctx, i); err != nil {
					cancel(err)
				}
			}
		})
	}
feed:
	for i := range n {
		select {
		case next <- i:
		case <-ctx.Done():
			break feed
		}
	}
	close(next)
	wg.Wait()
	if err := context.Cause(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return ctx.Err()
}
