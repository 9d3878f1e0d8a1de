package stream

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/wire"
)

// StateFile is the name of the stream's state file in Config.StateDir.
const StateFile = "stream.json"

const stateVersion = 1

// seqLease is how many sequence numbers are reserved on disk ahead of use.
// The state file always holds a bound above every sequence ever used, so a
// crash can skip numbers but never reuse one (a reused number would be
// dropped by the process server as a duplicate: silent loss).
const seqLease = 1 << 20

// persisted is the JSON state file.
type persisted struct {
	Version int    `json:"version"`
	Machine string `json:"machine"`
	// NextSeq: no sequence number ≥ NextSeq has ever been used.
	NextSeq  uint64          `json:"next_seq"`
	AckedSeq uint64          `json:"acked_seq"` // every record ≤ this was acknowledged
	Disks    []persistedDisk `json:"disks"`
	// RecoverableUntil is the process server's last word on it: the
	// next run reports its RPO from it until the process server answers.
	RecoverableUntil time.Time `json:"recoverable_until,omitzero"`
	// UnrecoverableSince: since then the process server has said that
	// nothing is recoverable (a first sync under way).
	UnrecoverableSince time.Time `json:"unrecoverable_since,omitzero"`
}

type persistedDisk struct {
	Name       string `json:"name"`
	Generation string `json:"generation"` // hex; "" = none
}

// SavedRecoverableUntil returns the time the state in dir has machine's
// RPO count from (zero if none): the last recoverable_until heard, or,
// while nothing was recoverable, since when. An agent reports its RPO
// from it before it reaches the process server.
func SavedRecoverableUntil(dir, machine string) time.Time {
	p, err := loadPersisted(filepath.Join(dir, StateFile))
	if err != nil || p == nil || p.Machine != machine {
		return time.Time{}
	}
	if p.RecoverableUntil.IsZero() {
		return p.UnrecoverableSince
	}
	return p.RecoverableUntil
}

func loadPersisted(path string) (*persisted, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("stream state: %w", err)
	}
	var p persisted
	if err := json.Unmarshal(b, &p); err != nil {
		return nil, fmt.Errorf("stream state %s is corrupt (%v); move it away to start over with a full sync", path, err)
	}
	if p.Version != stateVersion {
		return nil, fmt.Errorf("stream state %s: version %d, this build reads version %d", path, p.Version, stateVersion)
	}
	return &p, nil
}

func parseGeneration(s string) (wire.Generation, error) {
	var g wire.Generation
	if s == "" {
		return g, nil
	}
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != len(g) {
		return g, fmt.Errorf("bad generation %q", s)
	}
	copy(g[:], b)
	return g, nil
}

func formatGeneration(g wire.Generation) string {
	if g.IsZero() {
		return ""
	}
	return g.String()
}

// errNotDurable wraps a writeFileSync failure past its rename: the new
// content is in place, but a crash may bring the old one back.
var errNotDurable = errors.New("replaced, but its directory could not be synced")

// syncDir fsyncs directory dir (a variable for tests).
var syncDir = func(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// writeFileSync replaces path atomically and durably: temp file, fsync,
// rename, fsync of the directory. A failure of the last step is
// errNotDurable.
func writeFileSync(path string, b []byte) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	if err := syncDir(filepath.Dir(path)); err != nil {
		return fmt.Errorf("%s %w: %w", path, errNotDurable, err)
	}
	return nil
}
