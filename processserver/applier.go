package processserver

import (
	"context"

	"github.com/lifeboat-dr/lifeboat/internal/wire"
)

// Applier applies uploaded journal segments to the replica page blobs. The
// process server calls it; it reports back with Server.Applied.
//
// Wiring (the applier needs the server to report progress, the server
// needs the applier to notify it, so the server builds it):
//
//	cfg.NewApplier = func(ps *processserver.Server) (processserver.Applier, error) {
//		return applier.New(store, ps /* calls ps.Applied */, …)
//	}
//
// Segments of a machine stay in the cache until Applied covers them, so
// after a restart every segment not yet applied is uploaded (if needed)
// and notified again.
type Applier interface {
	// Notify tells the applier that every journal segment of machine up
	// to and including durableSeq is in the storage account
	// (layout.SegmentName, sealed with the machine's data key: see
	// Server.DataKey) and the manifest says so. It is called after every
	// upload, in increasing durableSeq order per machine, and once after
	// start for machines whose cached segments are not all applied. It
	// must not block: record the target and apply asynchronously.
	Notify(machine string, durableSeq uint64)

	// CompareSums answers a checksum-resync request of machine's agent:
	// apply every segment up to and including upTo (already uploaded when
	// this is called), then compare the SHA-256 of each chunk of s with
	// the replica page blob of s.Disk. It may block (until ctx is done);
	// the session keeps receiving while it runs.
	CompareSums(ctx context.Context, machine string, upTo uint64, s *wire.Sums) (wire.SumsReply, error)
}
