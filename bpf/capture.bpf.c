// SPDX-License-Identifier: GPL-2.0
//
// Lifeboat write capture.
//
// Every protected device is captured at submission: block_bio_queue
// copies the payload into the ring (data mode), or
// remembers the extent (pending) until the write completes, where it marks
// the dirty bitmap (metadata mode, ring full, device parked: the agent
// reads those blocks back). Extents go to the bitmap only at completion, so
// that the agent's read-back never reads a block before the write that
// dirtied it has landed. Completion is block_rq_complete for blk-mq
// devices (it walks the request's bios) and block_bio_complete for
// bio-based ones (device mapper, md).
//
// The kernel (seen on 6.18 with loop) now and then ends a write request
// without block_rq_complete: perf shows its issue and no completion. Its
// pending entry then outlives the bio; when a new bio reuses the address,
// track_bio settles the old write (late_completions), and the agent sweeps
// entries that are never reused (SweepStale).
//
// Pending entries live in a table (pending) of 8-way buckets, one per hash
// of the bio's address, whose slots are claimed and released by
// compare-and-swap on their tag; a hash map cost a bucket lock and a
// free-list push or pop per write, about as much as copying a 4 KiB
// payload. The agent maps the table to sweep it.
//
// Ordering contract with the agent (agent/engine.go, drain): a drain swaps
// the bitmap out, then bumps the drain epoch (lb_global.epoch, one word for
// every device, once the writes of the parity it moves to have landed) and
// waits for running programs (counters.inflight): every ring record made
// after that carries the new epoch, and its write is counted under the new
// parity (ring_flight). It swaps the bitmap out again (the marks of writes
// that completed before the records of the old epoch), drains the ring,
// holding back the records of the new epoch, waits for the writes of the
// old parity to land, clears the overflow flag, and reads the swapped
// blocks back before it applies any record it held back or that follows.
// Its read-back is then never older than anything it has already applied,
// and the devices' writes go on into the ring all along: a drain leaves
// no mark behind for the next one. A record of the new epoch committed
// before the second swap that meets one of its blocks may be older than
// the write that marked it: those blocks are marked again for the next
// drain. Once
// the overflow flag is set (the ring was full, or the agent parks the
// device as it stops), no program starts a new ring record for it.

#include "x86/vmlinux.h"
#include "bpf/bpf_helpers.h"
#include "bpf/bpf_core_read.h"
#include "bpf/bpf_tracing.h"
#include "capture.h"

char LICENSE[] SEC("license") = "GPL";

extern int bpf_iter_num_new(struct bpf_iter_num *it, int start, int end) __ksym;
extern int *bpf_iter_num_next(struct bpf_iter_num *it) __ksym;
extern void bpf_iter_num_destroy(struct bpf_iter_num *it) __ksym;
extern void *bpf_rdonly_cast(const void *obj__ign, __u32 btf_id__k) __ksym;

// as_bio turns a bio address held as a number (the request walk keeps it
// in map memory) back into a pointer that programs may read directly.
// Direct reads of kernel objects are single loads; BPF_CORE_READ would
// make a bpf_probe_read_kernel call for each field.
#define as_bio(addr) ((struct bio *)bpf_rdonly_cast((void *)(addr), bpf_core_type_id_kernel(struct bio)))

// Tuned by the loader before load.
const volatile __u64 wake_bytes = 1 << 20; // force a wake-up past this much unread data
const volatile __u64 wake_step = 1 << 18;  // bytes a CPU submits between two looks at that
const volatile __u32 agent_tgid = 0;       // calibration runs in the agent only

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 << 20); // resized by the loader
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LB_MAX_DEVICES);
	__type(key, __u32); // kernel dev_t (major << 20 | minor)
	__type(value, struct lb_dev);
} devices SEC(".maps");

// The same devices by agent id, for a pending write whose bio is gone.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LB_MAX_DEVICES);
	__type(key, __u32);
	__type(value, struct lb_dev);
} devinfo SEC(".maps");

// Whole disks holding protected partitions, by kernel dev_t.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LB_MAX_DEVICES);
	__type(key, __u32);
	__type(value, struct lb_disk);
} disks SEC(".maps");

// Per-device control words, shared with the agent through mmap.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, LB_MAX_DEVICES);
	__type(key, __u32);
	__type(value, struct lb_devstate);
} devstate SEC(".maps");

// One bit per 4 KiB block; devices own disjoint word ranges.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1); // resized by the loader
	__type(key, __u32);
	__type(value, __u64);
} bitmap SEC(".maps");

// Bios whose extent is reported at completion, in the bucket a hash of the
// bio's address picks (track_bio, pend_find, pend_take).
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, LB_PEND_BUCKETS);
	__type(key, __u32);
	__type(value, struct lb_bucket);
} pending SEC(".maps");

// Pending writes the agent swept before they completed, by bio address,
// so that their completion reads back the extent they were queued with:
// by then a bio-based driver may have trimmed the bio to its last piece
// (device mapper's splits), or re-pointed it to another device (an NVMe
// multipath head to a path). As many as the pending table holds.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, LB_PEND_BUCKETS * LB_PEND_WAYS);
	__type(key, __u64);
	__type(value, struct lb_pending);
} swept SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct lb_counters);
} counters SEC(".maps");

// Bitmap marks per CPU and device (cpu × LB_MAX_DEVICES + id), which the
// agent sums through mmap: it takes the bitmap when the sum moves. One
// count per device moved its cache line between the CPUs writes complete
// on, for every write in metadata mode.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, LB_MAX_DEVICES); // × possible CPUs, set by the loader
	__type(key, __u32);
	__type(value, __u64);
} marks SEC(".maps");

// Ring-captured writes started and finished, per device and CPU: a write
// is counted where it is queued and where it completes, usually another
// CPU, and a shared counter would move its cache line between them for
// every write. Both counts only grow, so the agent, summing finished
// before started (RingInflight), never reads fewer writes in flight than
// there were at some instant between its reads.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, LB_MAX_DEVICES);
	__type(key, __u32);
	__type(value, struct lb_flight);
} ring_flight SEC(".maps");

static __always_inline void ring_started(__u32 id, __u8 epoch)
{
	struct lb_flight *v = bpf_map_lookup_elem(&ring_flight, &id);
	if (v)
		__sync_fetch_and_add(&v->started[epoch & 1], 1);
}

static __always_inline void ring_finished(__u32 id, __u8 epoch)
{
	struct lb_flight *v = bpf_map_lookup_elem(&ring_flight, &id);
	if (v)
		__sync_fetch_and_add(&v->finished[epoch & 1], 1);
}

// Shared with the agent through mmap (epoch).
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct lb_global);
} global SEC(".maps");

static __always_inline struct lb_counters *ctrs(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&counters, &zero);
}

static __always_inline struct lb_global *glob(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&global, &zero);
}

// mark_word sets the bits of blocks [first, end) that fall in bitmap word
// w of device d.
static __always_inline void mark_word(struct lb_dev *d, __u64 w, __u64 first, __u64 end, struct lb_counters *c)
{
	__u64 lo = w << 6, hi = lo + 64;
	__u64 mask = ~0ULL;
	if (first > lo)
		mask &= ~0ULL << (first - lo);
	if (end < hi)
		mask &= ~0ULL >> (hi - end);
	__u32 idx = d->bitmap_word + w;
	__u64 *word = bpf_map_lookup_elem(&bitmap, &idx);
	if (word)
		__sync_fetch_and_or(word, mask);
	else if (c)
		c->mark_failures++;
}

// mark_bitmap sets the bits of [sector, sector+len) of device d.
static __always_inline void mark_bitmap(struct lb_dev *d, __u64 sector, __u32 len, struct lb_counters *c)
{
	__u64 first = sector >> (LB_BLOCK_SHIFT - 9);
	__u64 end = (sector + ((len + 511) >> 9) + (1 << (LB_BLOCK_SHIFT - 9)) - 1) >> (LB_BLOCK_SHIFT - 9);
	if (len == 0)
		end = first + 1;
	if (end > d->blocks)
		end = d->blocks;
	if (first >= end)
		return;
	__u64 fw = first >> 6, lw = (end - 1) >> 6;
	int n = lw - fw + 1;
	int *i;
	if (n > LB_MAX_MARK_WORDS) {
		// Cannot happen with the loader's limits; never lose it silently.
		if (c)
			c->mark_failures++;
		return;
	}
	if (n == 1) {
		mark_word(d, fw, first, end, c); // most writes (up to 256 KiB, aligned): no loop
	} else {
		bpf_for_each(num, i, 0, n) {
			mark_word(d, fw + *i, first, end, c);
		}
	}
	__u32 idx = bpf_get_smp_processor_id() * LB_MAX_DEVICES + d->id;
	__u64 *m = bpf_map_lookup_elem(&marks, &idx);
	if (m) {
		__sync_fetch_and_add(m, 1);
	} else {
		// No row for this CPU (cannot happen: the loader sizes the
		// map for every possible CPU); the sum must move all the same.
		__u32 id = d->id;
		struct lb_devstate *st = bpf_map_lookup_elem(&devstate, &id);
		if (st)
			__sync_fetch_and_add(&st->marks, 1);
	}
	if (c)
		c->bitmap_marks++;
}

// clock_of is the agent's monotonic clock, in seconds, as device id's
// state last got it: the stamp of pending entries. Reading it costs a load
// where bpf_ktime_get_ns costs a clock read per write.
static __always_inline __u32 clock_of(__u32 id)
{
	struct lb_devstate *st = bpf_map_lookup_elem(&devstate, &id);
	return st ? st->clock : 0;
}

// write_op reports whether opf is an operation capture follows (classify
// also weighs its size).
static __always_inline bool write_op(__u32 opf)
{
	switch (opf & 0xff) {
	case 1: // REQ_OP_WRITE
	case 3: // REQ_OP_DISCARD
	case 5: // REQ_OP_SECURE_ERASE
	case 9: // REQ_OP_WRITE_ZEROES
		return true;
	}
	return false;
}

static __always_inline int classify(__u32 opf, __u32 size)
{
	switch (opf & 0xff) {
	case 1: // REQ_OP_WRITE
		return size ? LB_OP_WRITE : -1; // empty preflush: nothing to replicate
	case 3: // REQ_OP_DISCARD
	case 5: // REQ_OP_SECURE_ERASE
		return LB_OP_DISCARD;
	case 9: // REQ_OP_WRITE_ZEROES
		return LB_OP_ZERO;
	}
	return -1;
}

static __always_inline void emit_header(struct lb_record *r, struct lb_dev *d, __u64 sector, __u32 len, int op,
					__u32 opf, __u32 data_len)
{
	struct lb_global *g = glob();
	r->seq = g ? __sync_fetch_and_add(&g->seq, 1) : 0;
	r->sector = sector;
	r->len = len;
	r->dev = d->id;
	r->op = op;
	r->flags = 0;
	if (opf & (1u << 17))
		r->flags |= LB_F_FUA;
	if (opf & (1u << 18))
		r->flags |= LB_F_PREFLUSH;
	r->data_len = data_len;
	r->epoch = 0;
}

// Submitted bytes per CPU since its last look at the ring's unread data.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} wake_acc SEC(".maps");

// wake_flag forces a reader wake-up once wake_bytes are unread. Querying
// the ring reads its consumer position, a cache line the reader writes for
// every record it takes (on another CPU): each CPU looks only once per
// wake_step bytes it has submitted (the reader also polls every 10 ms).
static __always_inline __u64 wake_flag(__u32 bytes)
{
	__u32 zero = 0;
	__u64 *acc = bpf_map_lookup_elem(&wake_acc, &zero);
	if (acc) {
		*acc += bytes;
		if (*acc < wake_step)
			return BPF_RB_NO_WAKEUP;
		*acc = 0;
	}
	return bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) >= wake_bytes ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
}

// bio_sector is the bio's first sector relative to its own block device
// (a partition's, not its disk's: see dev_of). By block_bio_queue, and so
// at completion, submit_bio_noacct has remapped every bio of a partition
// to disk sectors (blk_partition_remap), and a whole disk starts at 0, so
// the start is taken off unconditionally. (Testing BIO_REMAPPED instead
// would need its bit, which moves between kernels: 10 on 6.18, 11 or 12
// on 6.4-6.15, where 10 is another flag.)
static __always_inline __u64 bio_sector(struct bio *bio)
{
	return bio->bi_iter.bi_sector - bio->bi_bdev->bd_start_sect;
}

// dev_of returns the protected device bio writes to, or NULL. *key is its
// devices key and *start the sectors to add to bio_sector: a write to a
// partition of a protected whole disk (a file system on sda1 of a
// protected sda) is a write to the disk at the partition's offset. When
// none is, *key is bio's own device.
static __always_inline struct lb_dev *dev_of(struct bio *bio, __u32 *key, __u64 *start)
{
	struct block_device *bdev = bio->bi_bdev;
	__u32 dev = bdev->bd_dev;
	*key = dev;
	*start = 0;
	struct lb_dev *d = bpf_map_lookup_elem(&devices, &dev);
	if (d)
		return d;
	struct block_device *whole = bdev->bd_disk->part0;
	if (!whole || whole == bdev)
		return NULL;
	__u32 wdev = whole->bd_dev;
	d = bpf_map_lookup_elem(&devices, &wdev);
	if (d) {
		*key = wdev;
		*start = bdev->bd_start_sect;
	}
	return d;
}

// enter_overflow puts device st on the bitmap: the ring is full (or a
// record cannot be built), so this write and every later one go to the
// bitmap until the agent has drained and cleared the flag.
static __always_inline void enter_overflow(struct lb_devstate *st)
{
	if (!st->overflow) {
		st->overflow = 1;
		__sync_fetch_and_add(&st->overflow_events, 1);
	}
}

// Loop-carried state of copy_payload. It lives in map memory rather than in
// registers so that the verifier sees every iteration as the same state and
// checks the loop body once instead of once per iteration.
struct copy_state {
	__u64 src;   // kernel address of the next byte
	__u32 off;   // bytes copied
	__u32 vleft; // bytes left in the current bvec
	__u32 idx;   // next bvec
	__u32 skip;  // bytes of the next bvec already consumed (bi_bvec_done)
};

// Per CPU, indexed like addr_scratch (LB_SCRATCH_*): only lb_bio_queue
// copies (LB_SCRATCH_QUEUE), and a program does not nest in itself on a CPU.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, LB_SCRATCH_N);
	__type(key, __u32);
	__type(value, struct copy_state);
} copy_scratch SEC(".maps");

// copy_payload copies the bio's data into the dynptr after the header,
// with the scratch state of program who.
static __always_inline int copy_payload(struct bpf_dynptr *dp, struct bio *bio, __u32 size, __u64 po, __u64 vm,
					__u32 who)
{
	struct copy_state *s = bpf_map_lookup_elem(&copy_scratch, &who);
	if (!s)
		return -1;
	__u64 vecs = (__u64)bio->bi_io_vec;
	s->idx = bio->bi_iter.bi_idx;
	s->skip = bio->bi_iter.bi_bvec_done;
	s->off = 0;
	s->vleft = 0;
	s->src = 0;
	int *i;

	bpf_for_each(num, i, 0, LB_MAX_STEPS) {
		if (s->off >= size)
			break;
		if (s->vleft == 0) {
			struct bio_vec v;
			// A clone sharing a huge bvec array (dm, md) may start past
			// the mask's reach: copying a wrapped index would read
			// another part of the buffer; the bitmap takes it instead.
			if (s->idx > 0xffff)
				return -1;
			if (bpf_probe_read_kernel(&v, sizeof(v), (void *)(vecs + (s->idx & 0xffff) * sizeof(v))))
				return -1;
			s->idx++;
			if (v.bv_len <= s->skip) {
				s->skip -= v.bv_len;
				continue;
			}
			__u64 pfn = ((__u64)v.bv_page - vm) / bpf_core_type_size(struct page);
			s->src = po + (pfn << 12) + v.bv_offset + s->skip;
			s->vleft = v.bv_len - s->skip;
			s->skip = 0;
		}
		__u32 want = size - s->off;
		if (want > s->vleft)
			want = s->vleft;
		__u32 n;
		void *dst;
		// Constant copy sizes keep the verifier happy without masks.
		if (want >= 4096) {
			n = 4096;
			dst = bpf_dynptr_data(dp, sizeof(struct lb_record) + s->off, 4096);
		} else if (want >= 512) {
			n = 512;
			dst = bpf_dynptr_data(dp, sizeof(struct lb_record) + s->off, 512);
		} else if (want >= 64) {
			n = 64;
			dst = bpf_dynptr_data(dp, sizeof(struct lb_record) + s->off, 64);
		} else if (want >= 8) {
			n = 8;
			dst = bpf_dynptr_data(dp, sizeof(struct lb_record) + s->off, 8);
		} else {
			return -1; // bvecs are at least 8-byte granular
		}
		if (!dst)
			return -1;
		if (bpf_probe_read_kernel(dst, n, (void *)s->src))
			return -1;
		s->off += n;
		s->src += n;
		s->vleft -= n;
	}
	return s->off == size ? 0 : -1;
}

// mark_disk_write marks a write of size bytes at sector first that landed
// on whole disk dev over some of its protected partitions (dd to sda
// across sda1) in their bitmaps: it is read back, in any mode. It reports
// whether it marked anything. A global function, verified once rather
// than inside each caller's loop.
__noinline int mark_disk_write(__u32 dev, __u64 first, __u32 size)
{
	struct lb_disk *k = bpf_map_lookup_elem(&disks, &dev);
	if (!k)
		return 0;
	__u64 end = first + ((size + 511) >> 9);
	int marked = 0;
	int *i;
	bpf_for_each(num, i, 0, LB_MAX_PARTS) {
		__u32 j = *i;
		if (j >= LB_MAX_PARTS || j >= k->n)
			break;
		__u64 ps = k->part[j].start, pe = ps + k->part[j].sectors;
		if (end <= ps || first >= pe)
			continue;
		__u64 a = first > ps ? first : ps;
		__u64 b = end < pe ? end : pe;
		__u32 id = k->part[j].id;
		struct lb_dev *d = bpf_map_lookup_elem(&devinfo, &id);
		if (d) {
			mark_bitmap(d, a - ps, (b - a) << 9, ctrs());
			marked = 1;
		}
	}
	return marked;
}

// BLK_STS_AGAIN: how the block layer ends a REQ_NOWAIT bio it will not
// split, before any of it is issued (blk-mq). Bio-based drivers (device
// mapper, md) split such bios themselves and may end one with it after a
// part was written: only LB_PEND_NOWAIT entries trust it.
#define LB_STS_AGAIN 12

// settle ends the tracking of a write that has left the device: it landed,
// failed (status), or ended without capture seeing it end. A
// ring-captured write is uncounted from ring_flight, and read back if it
// failed: the ring holds data the device may not. Every other write is
// read back (marked), but for a nowait_split try the block layer refused.
static __always_inline void settle(struct lb_pending *pc, int status, struct lb_counters *c)
{
	bool failed = status != 0;
	if (status == LB_STS_AGAIN && pc->kind == LB_PEND_NOWAIT)
		return;
	if (pc->kind == LB_PEND_DISK) {
		mark_disk_write(pc->disk, pc->sector, pc->len);
		return;
	}
	__u32 id = pc->dev;
	struct lb_dev *d = bpf_map_lookup_elem(&devinfo, &id);
	if (!d || !d->blocks)
		return; // not a device of this capture (an entry from an earlier run)
	if (pc->kind == LB_PEND_RING) {
		ring_finished(id, pc->epoch);
		if (!failed)
			return;
	}
	// Counted running, as in lb_bio_queue: a quiesce that finds no
	// program running finds this mark in the bitmap.
	if (c)
		__sync_fetch_and_add(&c->inflight, 1);
	mark_bitmap(d, pc->sector, pc->len, c);
	if (c)
		__sync_fetch_and_add(&c->inflight, -1);
}

// take removes the entry under key from the swept map into *out. 1: this
// call deleted it, so it settles the write (whoever removes an entry
// settles it, the agent's sweep too); 0: no entry; -1: someone else
// deleted it meanwhile.
static __always_inline int take(void *map, __u64 *key, struct lb_pending *out)
{
	struct lb_pending *p = bpf_map_lookup_elem(map, key);
	if (!p)
		return 0;
	*out = *p;
	return bpf_map_delete_elem(map, key) ? -1 : 1;
}

// Scratch words, per CPU and per program (LB_SCRATCH_*), for addr_num. A
// program does not nest in itself on a CPU (the kernel skips such a run),
// but another may interrupt it there: each has its own word.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, LB_SCRATCH_N);
	__type(key, __u32);
	__type(value, __u64);
} addr_scratch SEC(".maps");

// addr_num returns a pointer's address as a number, the key of its pending
// entry. To the verifier a bio's address is a pointer, on which it allows
// no arithmetic but offsets (the key is hashed): stored into map memory,
// it reads back as a number (a privileged loader may do that).
static __always_inline __u64 addr_num(void *ptr, __u32 who)
{
	volatile __u64 *v = bpf_map_lookup_elem(&addr_scratch, &who);
	if (!v)
		return 0;
	*v = (__u64)ptr;
	return *v;
}

// pend_bucket returns key's bucket (key is a number: addr_num).
static __always_inline struct lb_bucket *pend_bucket(__u64 key)
{
	__u32 h = (key * 0x9E3779B97F4A7C15ULL) >> (64 - LB_PEND_BITS);
	return bpf_map_lookup_elem(&pending, &h);
}

// pend_find returns the tag of key's entry, and the entry in *p, or NULL.
static __always_inline __u64 *pend_find(__u64 key, struct lb_pending **p)
{
	if (key <= LB_TAG_BUSY)
		return 0;
	struct lb_bucket *b = pend_bucket(key);
	if (!b)
		return 0;
#pragma unroll
	for (__u32 i = 0; i < LB_PEND_WAYS; i++) {
		if (b->tag[i] == key) {
			*p = &b->p[i];
			return &b->tag[i];
		}
	}
	return 0;
}

// pend_known reports whether key has a pending entry.
static __always_inline bool pend_known(__u64 key)
{
	struct lb_pending *p;
	return pend_find(key, &p) != 0;
}

// pend_take removes key's pending entry into *out, as take does: 1 this
// call took it, 0 none, -1 someone else took it meanwhile (the agent's
// sweep, which settles it or, if it is a new bio's, puts it back; an
// entry put back is swept once stale). The entry is copied while the slot is busy, then the slot is
// freed (xchg: the copy is complete before another writer can claim it).
static __always_inline int pend_take(__u64 key, struct lb_pending *out)
{
	struct lb_pending *p;
	__u64 *tag = pend_find(key, &p);
	if (!tag)
		return 0;
	if (__sync_val_compare_and_swap(tag, key, LB_TAG_BUSY) != key)
		return -1;
	*out = *p;
	__sync_lock_test_and_set(tag, LB_TAG_FREE);
	return 1;
}

// settle_taken settles the entry under *keyp, if this call is the one
// that deletes it: its bio has ended unseen (the address is being reused).
// A global function, verified once for all its callers; the key comes by
// reference because a bio address is a pointer, not a scalar argument.
__noinline int settle_taken(__u64 *keyp)
{
	struct lb_pending oc;
	if (!keyp || pend_take(*keyp, &oc) != 1)
		return 0;
	struct lb_counters *c = ctrs();
	settle(&oc, 0, c);
	if (c)
		c->late_completions++;
	return 1;
}

// settle_swept reads back a write the agent swept before it completed
// (swept map), when its completion shows up where no pending entry is.
__noinline int settle_swept(__u64 *keyp)
{
	struct lb_pending tc;
	if (!keyp || take(&swept, keyp, &tc) != 1)
		return 0;
	settle(&tc, 0, ctrs());
	return 1;
}

// track_bio adds bio's pending entry in a free slot of its bucket; non-zero
// when they are all taken. An entry already under the bio's address there
// belongs to an earlier bio that has ended (its memory is being reused)
// without capture seeing it end: that write is settled now rather than at
// the agent's sweep, seconds later. The entry is written while its slot is
// busy and published by the xchg of its tag.
static __always_inline long track_bio(__u64 key, struct lb_pending *p, struct lb_counters *c)
{
	if (key <= LB_TAG_BUSY)
		return -1;
	struct lb_bucket *b = pend_bucket(key);
	if (!b)
		return -1;
#pragma unroll
	for (__u32 i = 0; i < LB_PEND_WAYS; i++) {
		if (b->tag[i] == key)
			settle_taken(&key);
	}
#pragma unroll
	for (__u32 i = 0; i < LB_PEND_WAYS; i++) {
		if (b->tag[i] == LB_TAG_FREE &&
		    __sync_val_compare_and_swap(&b->tag[i], LB_TAG_FREE, LB_TAG_BUSY) == LB_TAG_FREE) {
			b->p[i] = *p;
			__sync_lock_test_and_set(&b->tag[i], key);
			return 0;
		}
	}
	return -1;
}

// emit_data copies a write into a ring record; false when the ring is full
// or the record cannot be built or tracked (the caller takes the bitmap
// path). The bio, under its pending key, is counted in ring_flight before
// the record is visible, so the agent never applies a record whose write
// is not accounted for until it lands. The record carries the drain
// epoch and the count its parity, read after the caller counted itself
// running:
// an agent that bumps the epoch and then finds no program running knows
// every write counted under the old parity, and which records they are.
static __always_inline bool emit_data(struct bio *bio, struct lb_dev *d, struct lb_devstate *st, struct lb_global *g,
				      struct lb_counters *c, __u64 sector, __u32 size, int op, __u32 opf, __u64 key)
{
	__u32 epoch = *(volatile __u32 *)&g->epoch;
	__u32 data_len = op == LB_OP_WRITE ? size : 0;
	if (data_len > LB_MAX_RECORD_DATA || !g->page_offset)
		return false;
	struct bpf_dynptr dp;
	if (bpf_ringbuf_reserve_dynptr(&events, sizeof(struct lb_record) + data_len, 0, &dp)) {
		bpf_ringbuf_discard_dynptr(&dp, 0);
		return false;
	}
	if (data_len && copy_payload(&dp, bio, data_len, g->page_offset, g->vmemmap, LB_SCRATCH_QUEUE) < 0) {
		bpf_ringbuf_discard_dynptr(&dp, 0);
		c->copy_failures++;
		return false;
	}
	struct lb_record *r = bpf_dynptr_data(&dp, 0, sizeof(struct lb_record));
	if (!r) {
		bpf_ringbuf_discard_dynptr(&dp, 0);
		return false;
	}
	emit_header(r, d, sector, size, op, opf, data_len);
	r->epoch = epoch;
	struct lb_pending p = {.dev = d->id, .op = op, .kind = LB_PEND_RING, .opf = opf, .sector = sector, .len = size,
			       .stamp = clock_of(d->id), .epoch = epoch & 1};
	if (track_bio(key, &p, c)) {
		// Untracked, the record could be applied after a read-back of
		// its blocks taken before it landed: bitmap path.
		bpf_ringbuf_discard_dynptr(&dp, 0);
		c->pending_full++;
		return false;
	}
	ring_started(d->id, epoch);
	bpf_ringbuf_submit_dynptr(&dp, wake_flag(sizeof(struct lb_record) + data_len));
	c->records++;
	c->bytes += data_len;
	return true;
}

// nowait_split reports whether bio is a REQ_NOWAIT write its blk-mq queue
// will have to split: more bvecs than segments allowed (each bvec is at
// least one segment), or more bytes than a request may carry. Such a bio
// is ended with BLK_STS_AGAIN before any of it is issued (6.2+).
static __always_inline bool nowait_split(struct bio *bio, __u32 opf, __u32 size)
{
	if (!(opf & (1U << bpf_core_enum_value(enum req_flag_bits, __REQ_NOWAIT))))
		return false;
	struct request_queue *q = bio->bi_bdev->bd_disk->queue;
	if (!q->mq_ops)
		return false; // bio-based: it splits on its own terms
	__u32 segs = q->limits.max_segments, sectors = q->limits.max_sectors;
	return (segs && bio->bi_vcnt > segs) || (sectors && (size >> 9) > sectors);
}

static __always_inline void add_pending(__u64 key, struct lb_dev *d, __u64 sector, __u32 len, int op, __u32 opf,
					__u32 kind, struct lb_counters *c)
{
	struct lb_pending p = {.dev = d->id, .op = op, .kind = kind, .opf = opf, .sector = sector, .len = len,
			       .stamp = clock_of(d->id)};
	if (track_bio(key, &p, c)) {
		// Too many bios in flight to track: mark now and make the agent
		// re-read this extent after its next quiet point. The read may
		// come before the write lands: the entry also goes where swept
		// writes wait, so that its completion marks the extent it was
		// queued with again (by then a bio-based driver may have trimmed
		// the bio to its last piece, device mapper's splits).
		mark_bitmap(d, sector, len, c);
		bpf_map_update_elem(&swept, &key, &p, BPF_ANY);
		if (c)
			c->pending_full++;
	}
}

// track_disk_write remembers a write to whole disk dev, if it holds
// protected partitions, until it completes: its overlap with them is then
// read back (settle). Tracking it from submission, rather than looking at
// the bio only when it completes, survives drivers that consume the bio's
// iterator or re-point it to another device on the way.
static __always_inline void track_disk_write(struct bio *bio, __u32 dev)
{
	struct lb_disk *k = bpf_map_lookup_elem(&disks, &dev);
	if (!k)
		return;
	__u32 opf = bio->bi_opf;
	__u32 size = bio->bi_iter.bi_size;
	int op = classify(opf, size);
	if (op < 0)
		return;
	struct lb_counters *c = ctrs();
	struct lb_pending p = {.op = op, .kind = LB_PEND_DISK, .opf = opf, .len = size, .disk = dev,
			       .sector = bio->bi_iter.bi_sector, .stamp = clock_of(k->part[0].id)};
	if (!c)
		return;
	// The agent dates its coverage back while such writes happen: one
	// whose completion goes unreported waits for the sweep.
	c->disk_writes++;
	__u64 key = addr_num(bio, LB_SCRATCH_QUEUE);
	if (track_bio(key, &p, c)) {
		// Too many writes in flight to track: marked now and kept where
		// swept writes wait, as in add_pending. Its completion may not
		// describe it (a multipath head re-points it to a path device,
		// some drivers consume its iterator), and must mark the extent
		// again after it landed.
		mark_disk_write(dev, p.sector, size);
		bpf_map_update_elem(&swept, &key, &p, BPF_ANY);
		c->pending_full++;
	}
}

SEC("tp_btf/block_bio_queue")
int BPF_PROG(lb_bio_queue, struct bio *bio)
{
	if (!write_op(bio->bi_opf))
		return 0; // reads, flushes: no device lookup
	__u32 dev;
	__u64 start;
	struct lb_dev *d = dev_of(bio, &dev, &start);
	if (!d) {
		track_disk_write(bio, dev);
		return 0;
	}

	__u32 opf = bio->bi_opf;
	__u32 size = bio->bi_iter.bi_size;
	int op = classify(opf, size);
	if (op < 0)
		return 0;
	__u64 sector = bio_sector(bio) + start;

	struct lb_counters *c = ctrs();
	if (!c)
		return 0;
	__u64 key = addr_num(bio, LB_SCRATCH_QUEUE);
	if (d->mode == LB_MODE_METADATA) {
		add_pending(key, d, sector, size, op, opf, LB_PEND_META, c);
		return 0;
	}
	__u32 id = d->id;
	struct lb_devstate *st = bpf_map_lookup_elem(&devstate, &id);
	struct lb_global *g = glob();
	if (!st || !g)
		return 0;
	if (nowait_split(bio, opf, size)) {
		// io_uring's first try of a write the device must split: the
		// block layer does not split a REQ_NOWAIT bio but ends it with
		// BLK_STS_AGAIN, and io_uring submits it again without the flag.
		// Recorded, it would reach the target without reaching the
		// device and be read back when it fails. Tracked instead: should
		// it land after all, it is read back.
		c->nowait_splits++;
		add_pending(key, d, sector, size, op, opf, LB_PEND_NOWAIT, c);
		return 0;
	}
	// Counted running before the flag is read (both full barriers): the
	// agent, which sets the flag and then waits for running programs,
	// either sees this run or this run sees the flag.
	__sync_fetch_and_add(&c->inflight, 1);
	if (st->overflow || !emit_data(bio, d, st, g, c, sector, size, op, opf, key)) {
		// Every bio that takes the bitmap path, the one that filled the
		// ring and those while the device overflows or a drain parks it.
		if (!st->overflow)
			enter_overflow(st);
		c->overflow_bios++;
		add_pending(key, d, sector, size, op, opf, LB_PEND_OVERFLOW, c);
	}
	__sync_fetch_and_add(&c->inflight, -1);
	return 0;
}

// mark_landed marks the blocks of a write that completed on a protected
// device (or on a whole disk over protected partitions only, with
// disk_only) without a record to show for it; they are read back like an
// overflow. It reports whether it marked.
static __always_inline bool mark_landed(struct bio *bio, bool disk_only)
{
	__u32 opf = bio->bi_opf;
	__u32 size = bio->bi_iter.bi_size;
	if (classify(opf, size) < 0)
		return false;
	__u32 key;
	__u64 start;
	struct lb_dev *d = dev_of(bio, &key, &start);
	if (!d)
		return mark_disk_write(key, bio->bi_iter.bi_sector, size);
	if (disk_only)
		return false;
	mark_bitmap(d, bio_sector(bio) + start, size, ctrs());
	return true;
}

// complete_untracked handles writes that completed on a protected device
// without having been seen at submission: they were in flight when
// capture attached.
static __always_inline void complete_untracked(struct bio *bio)
{
	if (mark_landed(bio, false)) {
		struct lb_counters *c = ctrs();
		if (c)
			c->untracked++;
	}
}

// complete_bio handles the completion of a tracked bio (or bio piece).
static __always_inline void complete_bio(struct bio *bio, __u64 key, int error)
{
	struct lb_pending pc;
	switch (pend_take(key, &pc)) {
	case 0:
		// Swept while in flight: the extent it was queued with. Its
		// range now is marked as well, as the swept entry may be an
		// earlier bio's at this address, whose completion never came.
		if (settle_swept(&key))
			mark_landed(bio, false);
		else
			complete_untracked(bio);
		return;
	case 1:
		settle(&pc, error, ctrs());
	} // -1: swept by the agent meanwhile, which settled the write
}

// Bio-based drivers (device mapper, md) report completion per bio.
SEC("tp_btf/block_bio_complete")
int BPF_PROG(lb_bio_complete, struct request_queue *q, struct bio *bio)
{
	complete_bio(bio, addr_num(bio, LB_SCRATCH_BIO_COMPLETE), bio->bi_status);
	return 0;
}

// complete_rq_bio handles one bio of a completing request; addr is its
// address as a number, its pending key. A tracked write is settled from
// its entry, whatever device it completes on (a stacked driver may have
// re-pointed it: an NVMe multipath head to its path), without looking its
// device up.
static __always_inline void complete_rq_bio(struct bio *bio, __u64 addr, int error)
{
	if (!write_op(bio->bi_opf))
		return; // never tracked
	struct lb_pending pc;
	switch (pend_take(addr, &pc)) {
	case 1:
		settle(&pc, error, ctrs());
		return;
	case -1:
		return; // swept by the agent meanwhile, which settled the write
	}
	// As in complete_bio: the swept extent, and the range it completes
	// with (the swept entry may be an earlier bio's at this address).
	__u64 k = addr;
	int swept = settle_swept(&k);
	__u32 key;
	__u64 start;
	if (dev_of(bio, &key, &start)) {
		if (swept)
			mark_landed(bio, false);
		else
			complete_untracked(bio);
		return;
	}
	__u32 size = bio->bi_iter.bi_size;
	if (classify(bio->bi_opf, size) < 0)
		return;
	mark_disk_write(key, bio->bi_iter.bi_sector, size);
}

struct rq_walk {
	__u64 bio;
	__u32 done;
	__u32 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rq_walk);
} rq_scratch SEC(".maps");

// blk-mq drivers (loop, nvme, virtio, scsi) trace completion per request
// and suppress the per-bio event, so walk the request's bios: those fully
// covered by nr_bytes have landed.
SEC("tp_btf/block_rq_complete")
int BPF_PROG(lb_rq_complete, struct request *rq, blk_status_t error, unsigned int nr_bytes)
{
	__u32 zero = 0;
	struct rq_walk *w = bpf_map_lookup_elem(&rq_scratch, &zero);
	if (!w)
		return 0;
	w->bio = (__u64)rq->bio;
	w->done = 0;
	int *i;
	// Up to 32 MiB of 512-byte bios: a request holds no more (an open-coded
	// iterator, so the bound costs nothing until reached).
	bpf_for_each(num, i, 0, 65536) {
		__u64 addr = w->bio;
		if (!addr)
			break;
		struct bio *b = as_bio(addr);
		__u32 size = b->bi_iter.bi_size;
		if (w->done + size > nr_bytes) {
			// Partly done: this part is not described by any iterator
			// once the bio advances. A write to a whole disk over
			// protected partitions, or an untracked one (in flight
			// when capture attached), is read back whole now: its
			// completion will only describe the rest. A tracked
			// write is settled from its pending entry, which holds
			// all of it, when it completes.
			if (nr_bytes > w->done)
				mark_landed(b, pend_known(addr));
			break;
		}
		w->done += size;
		w->bio = (__u64)b->bi_next;
		complete_rq_bio(b, addr, error);
	}
	return 0;
}

// A bio split to fit the device's limits completes piece by piece: the
// front piece becomes a tracked bio of its own, the parent keeps the rest.
SEC("tp_btf/block_split")
int BPF_PROG(lb_split, struct bio *split, unsigned int new_sector)
{
	__u64 parent = addr_num(split->bi_private, LB_SCRATCH_SPLIT);
	struct lb_pending *pp;
	__u64 *ptag = pend_find(parent, &pp);
	if (!ptag)
		return 0; // no parent (bi_private is not always one), or untracked
	__u64 key = addr_num(split, LB_SCRATCH_SPLIT);
	if (pend_known(key))
		return 0; // already tracked itself (device mapper traces the remainder)
	// The parent's slot is held busy while its entry changes.
	if (__sync_val_compare_and_swap(ptag, parent, LB_TAG_BUSY) != parent)
		return 0;
	struct lb_pending front = *pp;
	__u32 flen = split->bi_iter.bi_size;
	front.len = flen;
	struct lb_counters *c = ctrs();
	if (track_bio(key, &front, c)) {
		// Untracked, the front is marked by its own completion
		// (complete_untracked), from its own iterator.
		if (c)
			c->pending_full++;
	} else if (front.kind == LB_PEND_RING) {
		ring_started(front.dev, front.epoch);
	}
	// The parent goes on where the front ends, tracked or not: the next
	// front is taken from its start. (Left whole after an untracked
	// front, every later front was recorded one piece early, and the
	// completion of each marked its predecessor's range, not its own.)
	if (pp->len > flen) {
		pp->sector += flen >> 9;
		pp->len -= flen;
	}
	__sync_lock_test_and_set(ptag, parent);
	return 0;
}

// Calibration: find the direct map (page_offset_base) and the struct page
// array (vmemmap_base), which memory KASLR randomises and which this
// kernel does not export. Both are 1 GiB aligned. A struct page of the
// agent's own vmapped stack gives vmemmap_base (struct pages of the first
// 64 GiB of RAM fit in the first 1 GiB of vmemmap; bigger machines are
// tried upwards). The pgd of the agent's mm, whose struct ptdesc points back
// at the mm, then pins page_offset_base.
SEC("tp_btf/sys_enter")
int BPF_PROG(lb_calibrate, struct pt_regs *regs, long id)
{
	if ((bpf_get_current_pid_tgid() >> 32) != agent_tgid)
		return 0;
	struct lb_global *g = glob();
	if (!g || g->page_offset)
		return 0;
	struct task_struct *t = bpf_get_current_task_btf();
	struct mm_struct *mm = t->mm;
	if (!mm)
		return 0;
	__u64 pgd = (__u64)BPF_CORE_READ(mm, pgd);
	struct page *pg = 0;
	struct vm_struct *area = BPF_CORE_READ(t, stack_vm_area);
	if (area) {
		struct page **pages = BPF_CORE_READ(area, pages);
		bpf_probe_read_kernel(&pg, sizeof(pg), pages);
	}
	if (!pg || !pgd) {
		g->calib_status = 2;
		return 0;
	}
	const __u64 G = 1ULL << 30;
	__u64 sz = bpf_core_type_size(struct page);
	int *k, *j;
	bpf_for_each(num, k, 0, LB_CALIB_MAX_VM) {
		__u64 vm = ((__u64)pg & ~(G - 1)) - (__u64)(*k) * G;
		bpf_for_each(num, j, 0, LB_CALIB_MAX_GB) {
			__u64 phys = (pgd & (G - 1)) + (__u64)(*j) * G;
			struct ptdesc *pt = (struct ptdesc *)(vm + (phys >> 12) * sz);
			struct mm_struct *owner = 0;
			if (bpf_probe_read_kernel(&owner, sizeof(owner), &pt->pt_mm))
				continue;
			if (owner == mm) {
				g->vmemmap = vm;
				g->page_offset = pgd - phys;
				g->calib_status = 1;
				return 0;
			}
		}
	}
	g->calib_status = 3;
	return 0;
}

// Keep the shared types in BTF so bpf2go can generate their Go twins.
const struct lb_record *unused_record __attribute__((unused));
const struct lb_dev *unused_dev __attribute__((unused));
const struct lb_devstate *unused_devstate __attribute__((unused));
const struct lb_counters *unused_counters __attribute__((unused));
const struct lb_global *unused_global __attribute__((unused));
const struct lb_pending *unused_pending __attribute__((unused));
const struct lb_bucket *unused_bucket __attribute__((unused));
const struct lb_flight *unused_flight __attribute__((unused));
