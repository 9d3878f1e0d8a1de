// Package stage labels goroutines with the pipeline stage they work for,
// so that a CPU profile of the process server splits its CPU time by stage
// (lifeboat bench pipeline reads it from /debug/pprof/profile).
package stage

import (
	"context"
	"runtime/pprof"
)

// Key is the pprof label key; the values are the constants below.
const Key = "stage"

// The stages. Ingest, Prepare and the cache writes inside Ingest are the
// process server's work before upload.
const (
	Ingest  = "ingest"  // TLS, frame decoding, cache writes, acks
	Prepare = "prepare" // cache read, segment scan, compression, encryption
	Upload  = "upload"  // journal and manifest requests
	Apply   = "apply"   // replica page blobs, recovery points, retention
)

// Do runs f with goroutine label Key=name; goroutines f starts inherit it.
func Do(ctx context.Context, name string, f func(context.Context)) {
	pprof.Do(ctx, pprof.Labels(Key, name), f)
}
