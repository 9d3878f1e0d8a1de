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
	buf := make([]byte, roundPage(uint64(s.ChunkSize)))
	for i := range s.Sums {
		// Beyond the disk, or past 2^64: nothing to compare.
		rel := uint64(i) * uint64(s.ChunkSize)
		if s.Offset >= size || rel >= size-s.Offset {
			reply.Differs[i] = true
			continue
		}
		off := s.Offset + rel
		n := min(uint64(s.ChunkSize), size-off)
		rd := roundPage(n)
		if off+rd > uint64(info.Size) || off%blobstore.PageSize != 0 {
			reply.Differs[i] = true
			continue
		}
		if err := store.ReadPages(ctx, name, "", int64(off), buf[:rd]); err != nil {
			return reply, fmt.Errorf("read replica %s at %d: %w", name, off, err)
		}
		reply.Differs[i] = sha256.Sum256(buf[:n]) != s.Sums[i]
	}
	return reply, nil
}

func roundPage(n uint64) uint64 {
	return (n + blobstore.PageSize - 1) &^ (blobstore.PageSize - 1)
}
