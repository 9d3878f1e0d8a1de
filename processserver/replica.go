package processserver

import (
	"context"
	"crypto/sha256"
	"fmt"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
)

// ApplyManager is the part of an applier loop manager (applier.Manager)
// that ManagedApplier needs.
type ApplyManager interface {
	// Durable hands the applier a new durable sequence; it never blocks.
	Durable(machine string, seq uint64)
	// WaitApplied blocks until machine's replicas are applied up to seq.
	WaitApplied(ctx context.Context, machine string, seq uint64) error
}

// ManagedApplier adapts an ApplyManager to Applier. It answers checksum
// resyncs by waiting until the replica is applied up to the request, then
// comparing with the replica page blob in ps's store:
//
//	cfg.NewApplier = func(ps *processserver.Server) (processserver.Applier, error) {
//		a, err := applier.New(applier.Config{Store: store, UpdateManifest: ps.UpdateManifest,
//			Fence: ps.Fence, Fenced: ps.ReplicaFenced, …})
//		if err != nil {
//			return nil, err
//		}
//		return processserver.ManagedApplier(ps, a.NewManager(ctx, ps.Applied)), nil
//	}
func ManagedApplier(ps *Server, mg ApplyManager) Applier { return managed{ps, mg} }

type managed struct {
	ps *Server
	mg ApplyManager
}

func (a managed) Notify(machine string, seq uint64) { a.mg.Durable(machine, seq) }

// Stop ends machine's applying, if the manager can (applier.Manager).
func (a managed) Stop(machine string) {
	if s, ok := a.mg.(interface{ Stop(string) }); ok {
		s.Stop(machine)
	}
}

// Resume starts machine's applying again after Stop, if the manager can.
func (a managed) Resume(machine string) {
	if s, ok := a.mg.(interface{ Resume(string) }); ok {
		s.Resume(machine)
	}
}

func (a managed) CompareSums(ctx context.Context, machine string, upTo uint64, s *wire.Sums) (wire.SumsReply, error) {
	if err := a.mg.WaitApplied(ctx, machine, upTo); err != nil {
		return wire.SumsReply{}, err
	}
	man, _ := a.ps.Manifest(machine)
	d := man.Disk(s.Disk)
	if d == nil {
		return wire.SumsReply{}, fmt.Errorf("disk %q is not in the manifest of %s", s.Disk, machine)
	}
	if d.GenerationStart > upTo {
		// No record of the disk's current generation is applied yet:
		// the replica holds the one before, and the first record of
		// this one recreates it empty. A chunk skipped as the same
		// would be zeros then.
		return allDiffer(s), nil
	}
	return CompareReplica(ctx, a.ps.store, machine, d.Size, d.Generation, s)
}

func allDiffer(s *wire.Sums) wire.SumsReply {
	reply := wire.SumsReply{ID: s.ID, Differs: make([]bool, len(s.Sums))}
	for i := range reply.Differs {
		reply.Differs[i] = true
	}
	return reply
}

// CompareReplica compares the chunk checksums of s with the replica page
// blob of s.Disk (whose disk, of generation gen, is size bytes long; the
// last chunk ends there). A chunk is reported as differing if it lies
// beyond the blob, or the blob is missing or of another generation.
func CompareReplica(ctx context.Context, store blobstore.Store, machine string, size uint64, gen string, s *wire.Sums) (wire.SumsReply, error) {
	name := layout.DiskName(machine, s.Disk)
	info, err := store.Stat(ctx, name)
	if blobstore.IsNotFound(err) || err == nil && info.Metadata[layout.MetaGeneration] != gen {
		return allDiffer(s), nil
	}
	reply := wire.SumsReply{ID: s.ID, Differs: make([]bool, len(s.Sums))}
	if err != nil {
		return reply, err
	}
	cs := uint64(s.ChunkSize)
	// chunk returns chunk i's offset and length, ok if the replica holds
	// it: within the disk (and 2^64) and the blob, on a page boundary.
	chunk := func(i int) (off, n uint64, ok bool) {
		rel := uint64(i) * cs
		if s.Offset >= size || rel >= size-s.Offset {
			return 0, 0, false
		}
		off = s.Offset + rel
		n = min(cs, size-off)
		return off, n, off+roundPage(n) <= uint64(info.Size) && off%blobstore.PageSize == 0
	}
	var buf []byte
	for i := 0; i < len(s.Sums); {
		off, n, ok := chunk(i)
		if !ok {
			reply.Differs[i] = true // nothing to compare
			i++
			continue
		}
		// The chunks that follow, read with this one: one request per
		// compareRead, not one per chunk (a round trip each on Azure).
		j, end := i+1, off+n
		for ; j < len(s.Sums) && end-off+cs <= compareRead && n == cs; j++ {
			o, m, ok := chunk(j)
			if !ok || o != end {
				break
			}
			end, n = end+m, m
		}
		rd := roundPage(end - off)
		if uint64(cap(buf)) < rd {
			buf = make([]byte, rd)
		}
		if err := store.ReadPages(ctx, name, "", int64(off), buf[:rd]); err != nil {
			return reply, fmt.Errorf("read replica %s at %d: %w", name, off, err)
		}
		for k := i; k < j; k++ {
			lo := uint64(k-i) * cs
			reply.Differs[k] = sha256.Sum256(buf[lo:min(lo+cs, end-off)]) != s.Sums[k]
		}
		i = j
	}
	return reply, nil
}

// compareRead bounds what CompareReplica reads at once (Azure's largest
// Get Blob range that returns a content MD5 is 4 MiB; any size works).
const compareRead = 4 << 20

func roundPage(n uint64) uint64 {
	return (n + blobstore.PageSize - 1) &^ (blobstore.PageSize - 1)
}
