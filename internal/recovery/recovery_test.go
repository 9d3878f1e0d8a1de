package recovery_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/mem"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/recovery"
	"github.com/lifeboat-dr/lifeboat/internal/recovery/recoverytest"
	"github.com/lifeboat-dr/lifeboat/internal/seal"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
)

func randBytes(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

// journalOnly builds a machine whose journal was never applied (no
// recovery points): recovery starts from zeros.
func journalOnly(t *testing.T) (*recoverytest.Machine, time.Time) {
	rng := rand.New(rand.NewPCG(1, 1))
	m := recoverytest.New(t, mem.New(), "j", 256<<10+100)
	t0 := time.Date(2025, 5, 1, 0, 0, 0, 0, time.UTC)
	for s := range 5 {
		for i := range 20 {
			off := uint64(rng.IntN(250 << 10))
			switch i % 5 {
			case 3:
				m.Zero(0, off, uint32(1+rng.IntN(6000)))
			case 4:
				m.Discard(0, off&^511, 1024)
			default:
				m.Write(0, off, randBytes(rng, 1+rng.IntN(5000)))
			}
			if i%7 == 0 {
				m.InlineMarker(wire.MarkerTime, t0.Add(time.Duration(s*20+i)*time.Second))
			}
		}
		m.Marker(wire.MarkerTime, t0.Add(time.Duration(s*20+19)*time.Second))
		m.Cut()
	}
	return m, t0
}

func recoverBytes(t *testing.T, m *recoverytest.Machine, point string, key []byte) ([]byte, recovery.Result, error) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "out")
	res, err := recovery.RecoverFile(context.Background(), m.Store, recovery.Request{Machine: m.Name, Disk: "d0", Point: point, RecoveryKey: key}, path)
	if err != nil {
		return nil, res, err
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
		t.Fatalf("recovered image has mode %v, want 0600", fi.Mode().Perm())
	}
	return b, res, nil
}

func TestRecoverFromJournal(t *testing.T) {
	m, t0 := journalOnly(t)
	size := m.Disks[0].Size
	for _, tc := range []struct {
		point string
		seq   uint64
	}{
		{"latest", m.Latest()},
		{"1", 1},
		{fmt.Sprint(m.Durable / 2), m.Durable / 2},
	} {
		got, res, err := recoverBytes(t, m, tc.point, m.RecoveryKey)
		if err != nil {
			t.Fatalf("%s: %v", tc.point, err)
		}
		if res.Seq != tc.seq || res.BaseID != "" || int64(len(got)) != int64(size) {
			t.Fatalf("%s: %+v, %d bytes", tc.point, res, len(got))
		}
		if !bytes.Equal(got, m.Image(0, tc.seq)[:size]) {
			t.Fatalf("%s: recovered image differs from the model at seq %d", tc.point, tc.seq)
		}
	}
	// Times resolve to the last marker at or before them, found inside
	// the segments (inline and frame markers alike).
	for _, mk := range m.Markers() {
		at := time.Unix(0, mk.UnixNano).UTC()
		for _, p := range []time.Time{at, at.Add(999 * time.Millisecond)} {
			if p.After(t0.Add(99 * time.Second)) {
				continue // after recoverable_until (tested in TestRecoverErrors)
			}
			got, res, err := recoverBytes(t, m, p.Format(time.RFC3339Nano), m.RecoveryKey)
			if err != nil {
				t.Fatalf("%s: %v", p, err)
			}
			if res.Seq != mk.Seq || !res.Time.Equal(at) {
				t.Fatalf("time %s: recovered seq %d at %s, want marker seq %d at %s", p, res.Seq, res.Time, mk.Seq, at)
			}
			if !bytes.Equal(got, m.Image(0, mk.Seq)[:size]) {
				t.Fatalf("time %s: image differs from the model at seq %d", p, mk.Seq)
			}
		}
	}
	_, until, err := recovery.Points(context.Background(), m.Store, m.Name)
	if err != nil || !until.Equal(t0.Add(99*time.Second)) {
		t.Fatalf("recoverable until %s, %v; want %s", until, err, t0.Add(99*time.Second))
	}
}

func TestRecoverErrors(t *testing.T) {
	m, t0 := journalOnly(t)
	ctx := context.Background()
	req := func(point string) recovery.Request {
		return recovery.Request{Machine: m.Name, Disk: "d0", Point: point, RecoveryKey: m.RecoveryKey}
	}
	for _, tc := range []struct {
		req  recovery.Request
		is   error
		text string
	}{
		{req(t0.Add(-time.Second).Format(time.RFC3339)), recovery.ErrOutOfRange, "oldest recoverable time " + t0.Format(time.RFC3339)},
		{req(t0.Add(100 * time.Second).Format(time.RFC3339)), recovery.ErrOutOfRange, "recoverable_until"},
		{req(fmt.Sprint(m.Durable + 1)), recovery.ErrOutOfRange, "beyond the newest durable sequence"},
		{req("yesterday"), nil, "RFC 3339"},
		{recovery.Request{Machine: m.Name, Disk: "sdz", Point: "latest", RecoveryKey: m.RecoveryKey}, nil, `no disk "sdz" (disks: d0)`},
		{recovery.Request{Machine: "other", Disk: "d0", Point: "latest", RecoveryKey: m.RecoveryKey}, recovery.ErrNoMachine, "other/manifest.json"},
		{recovery.Request{Machine: m.Name, Disk: "d0", Point: "latest", RecoveryKey: seal.NewRecoveryKey()}, recovery.ErrWrongRecoveryKey, seal.Fingerprint(m.RecoveryKey)},
	} {
		_, err := recovery.Recover(ctx, m.Store, tc.req, &recoverytest.Output{})
		if err == nil || (tc.is != nil && !errors.Is(err, tc.is)) || !strings.Contains(err.Error(), tc.text) {
			t.Errorf("%+v: %v; want %v containing %q", tc.req.Point, err, tc.is, tc.text)
		}
	}

	// A tampered key blob whose fingerprint matches is reported as such.
	keys, err := m.Store.ListBlobs(ctx, m.Name+"/keys/")
	if err != nil || len(keys) != 1 {
		t.Fatal(keys, err)
	}
	m.Tamper(keys[0].Name)
	defer func() {
		// A machine whose key blobs are gone says so, not that the
		// machine is unknown.
		if err := m.Store.DeleteBlob(ctx, keys[0].Name); err != nil {
			t.Fatal(err)
		}
		if _, err := recovery.Recover(ctx, m.Store, req("latest"), &recoverytest.Output{}); !errors.Is(err, recovery.ErrNoDataKey) || errors.Is(err, recovery.ErrNoMachine) || !strings.Contains(err.Error(), m.Name+"/keys/") {
			t.Errorf("recover with the data key deleted: %v", err)
		}
	}()
	if _, err := recovery.Keyring(ctx, m.Store, m.Name, m.RecoveryKey); !errors.Is(err, recovery.ErrTampered) || errors.Is(err, recovery.ErrWrongRecoveryKey) || !strings.Contains(err.Error(), keys[0].Name) {
		t.Fatalf("tampered key blob, unwrapped with the key its fingerprint names: %v (want tampering, not a wrong key)", err)
	}

	// Recovery writes files only.
	if _, err := recovery.RecoverFile(ctx, m.Store, req("latest"), "/dev/null"); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Fatalf("recover to /dev/null: %v", err)
	}
}

func TestTamperedSegmentStopsBeforeWriting(t *testing.T) {
	m, _ := journalOnly(t)
	bad := m.Segments[2]
	m.Tamper(bad)
	out := &recoverytest.Output{}
	_, err := recovery.Recover(context.Background(), m.Store, recovery.Request{Machine: m.Name, Disk: "d0", Point: "latest", RecoveryKey: m.RecoveryKey}, out)
	if !errors.Is(err, recovery.ErrTampered) || !strings.Contains(err.Error(), bad) {
		t.Fatalf("recover over %s: %v", bad, err)
	}
	// Only records of the verified segments before it were written.
	_, last, _ := layout.ParseSegmentName(m.Segments[1])
	if want := m.Image(0, last)[:m.Disks[0].Size]; !bytes.Equal(out.B[:len(want)], want) {
		t.Fatal("output holds more or less than the verified segments before the tampered one")
	}
}

func TestDecodeRejectsOutOfOrder(t *testing.T) {
	var b wire.BatchBuilder
	if err := b.Add(wire.Record{Seq: 5, Op: wire.OpZero, Offset: 0, Length: 512}); err != nil {
		t.Fatal(err)
	}
	p, _ := b.AppendBinary(nil)
	plain, _ := wire.AppendFrame(nil, wire.TypeBatch, 0, p)
	plain, _ = wire.AppendFrame(plain, wire.TypeBatch, 0, p) // seq 5 again
	var d recovery.Decoder
	if _, err := d.Decode(plain); !errors.Is(err, recovery.ErrMalformedSegment) {
		t.Fatalf("duplicate sequence: %v", err)
	}
	plain[len(plain)-1] ^= 1 // and a corrupt frame
	if _, err := d.Decode(plain); !errors.Is(err, recovery.ErrMalformedSegment) || !errors.Is(err, wire.ErrChecksum) {
		t.Fatalf("corrupt frame: %v", err)
	}
}

// A time inside an idle period resolves through the manifest's idle
// marker: the journal holds that period's markers only after the next
// write, but its records are all there.
func TestRecoverToIdlePeriod(t *testing.T) {
	m, t0 := journalOnly(t)
	// Records after the journal's last marker, then an idle period whose
	// first marker only the process server has seen (manifest fields).
	m.Write(0, 4096, bytes.Repeat([]byte{0xab}, 8192))
	m.Cut()
	lastJournal := m.Markers()[len(m.Markers())-1]
	idleSince := t0.Add(200 * time.Second)
	m.Until = idleSince.Add(5 * time.Second)
	m.WriteManifest()
	m.EditManifest(func(man *layout.Manifest) { man.IdleSeq, man.IdleSince = m.Durable, idleSince })
	if lastJournal.Seq >= m.Durable {
		t.Fatalf("setup: the last journal marker (seq %d) already covers seq %d", lastJournal.Seq, m.Durable)
	}
	size := m.Disks[0].Size
	got, res, err := recoverBytes(t, m, idleSince.Add(2*time.Second).Format(time.RFC3339Nano), m.RecoveryKey)
	if err != nil {
		t.Fatal(err)
	}
	if res.Seq != m.Durable || !bytes.Equal(got, m.Image(0, m.Durable)[:size]) {
		t.Fatalf("time in the idle period: recovered seq %d, want %d (every record)", res.Seq, m.Durable)
	}
	// Just before the idle period the journal's last marker still rules.
	if _, res, err := recoverBytes(t, m, idleSince.Add(-time.Second).Format(time.RFC3339Nano), m.RecoveryKey); err != nil || res.Seq != lastJournal.Seq {
		t.Fatalf("time before the idle period: seq %d, %v; want %d", res.Seq, err, lastJournal.Seq)
	}
}

// latest is the newest consistent state, the last marker the account
// holds: records after it may be a full sync under way (the agent holds
// its markers back meanwhile), and the disk half copied is no point in
// time. Before, latest meant durable_seq and gave that half-copied disk.
func TestLatestIsNotInsideASync(t *testing.T) {
	m, _ := journalOnly(t)
	size := m.Disks[0].Size
	lastMarker := m.Markers()[len(m.Markers())-1].Seq
	before := m.Image(0, lastMarker)[:size]
	// The disk is replaced: a new generation, half of its full sync sent.
	m.NewGeneration(0, 0)
	half := size / 2 &^ 511
	m.Write(0, 0, randBytes(rand.New(rand.NewPCG(9, 9)), int(half)))
	m.Cut()
	got, res, err := recoverBytes(t, m, "latest", m.RecoveryKey)
	if err != nil {
		t.Fatal(err)
	}
	if res.Seq != lastMarker || !bytes.Equal(got[:size], before) {
		t.Fatalf("latest during a full sync: seq %d (last marker %d, durable %d); the disk at the last marker: %v",
			res.Seq, lastMarker, m.Durable, bytes.Equal(got[:size], before))
	}
	// A sequence before a disk's first generation holds nothing of it.
	if _, _, err := recoverBytes(t, m, "0", m.RecoveryKey); !errors.Is(err, recovery.ErrOutOfRange) {
		t.Fatalf("recover to sequence 0: %v, want ErrOutOfRange", err)
	}
}

// The temporary output is a new file: a symlink planted where an older
// binary wrote its partial file is not followed (recover runs as root).
func TestRecoverFileIgnoresPlantedPartial(t *testing.T) {
	m, _ := journalOnly(t)
	dir := t.TempDir()
	victim := filepath.Join(dir, "victim")
	if err := os.WriteFile(victim, []byte("keep me"), 0o644); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "out")
	if err := os.Symlink(victim, path+".partial"); err != nil {
		t.Fatal(err)
	}
	res, err := recovery.RecoverFile(context.Background(), m.Store, recovery.Request{Machine: m.Name, Disk: "d0", Point: "latest", RecoveryKey: m.RecoveryKey}, path)
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(victim); string(b) != "keep me" {
		t.Fatal("recovery wrote through the planted symlink")
	}
	got, err := os.ReadFile(path)
	if err != nil || res.Seq != m.Latest() || !bytes.Equal(got, m.Image(0, m.Latest())[:m.Disks[0].Size]) {
		t.Fatalf("recovered image (seq %d, want %d) differs (%v)", res.Seq, m.Latest(), err)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v, want 0600", fi.Mode().Perm())
	}
}

// The journal's last segments deleted from the account (the sealed
// manifest still vouching for them): recovery to a point in them fails as
// tampering, not as a plain error.
func TestRecoverDeletedJournalEnd(t *testing.T) {
	m, _ := journalOnly(t)
	last := m.Segments[len(m.Segments)-1]
	if err := m.Store.DeleteBlob(context.Background(), last); err != nil {
		t.Fatal(err)
	}
	_, _, err := recoverBytes(t, m, strconv.FormatUint(m.Durable, 10), m.RecoveryKey)
	if !errors.Is(err, recovery.ErrTampered) || !strings.Contains(err.Error(), "journal is incomplete") {
		t.Fatalf("recover into a deleted journal end: %v, want ErrTampered", err)
	}
	// The newest state and a time after the last marker left would
	// resolve to that marker: an older state, silently.
	for _, point := range []string{"latest", m.Until.Format(time.RFC3339Nano)} {
		if _, res, err := recoverBytes(t, m, point, m.RecoveryKey); !errors.Is(err, recovery.ErrTampered) {
			t.Errorf("recover %s with the journal's end deleted: seq %d, %v; want ErrTampered", point, res.Seq, err)
		}
	}
	if _, _, _, err := recovery.VerifiedPoints(context.Background(), m.Store, m.Name, m.RecoveryKey, io.Discard); !errors.Is(err, recovery.ErrTampered) {
		t.Errorf("points --recovery-key with the journal's end deleted: %v, want ErrTampered", err)
	}
}

// The first journal segments deleted from the account of a machine that
// retention never pruned (journal_from 0, no recovery point covering
// them): tampering, not a retention window, which deletes only what a
// point covers.
func TestRecoverDeletedJournalStart(t *testing.T) {
	m, _ := journalOnly(t)
	if err := m.Store.DeleteBlob(context.Background(), m.Segments[0]); err != nil {
		t.Fatal(err)
	}
	_, res, err := recoverBytes(t, m, "latest", m.RecoveryKey)
	if !errors.Is(err, recovery.ErrTampered) || !strings.Contains(err.Error(), "not by retention") {
		t.Fatalf("recover with the journal's start deleted: seq %d, %v; want ErrTampered", res.Seq, err)
	}
}

// Another machine's manifest copied under this machine's name verifies
// (its seal covers the name it holds, and machines share a recovery key):
// it is refused for naming another machine.
func TestManifestOfAnotherMachineRefused(t *testing.T) {
	ctx := context.Background()
	store := mem.New()
	recoverytest.New(t, store, "a", 1<<20)
	recoverytest.New(t, store, "b", 1<<20)
	raw, err := store.GetBlob(ctx, layout.ManifestName("a"))
	if err != nil {
		t.Fatal(err)
	}
	if err := store.PutBlob(ctx, layout.ManifestName("b"), raw, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := recovery.ReadManifest(ctx, store, "b"); !errors.Is(err, recovery.ErrTampered) || !strings.Contains(err.Error(), `manifest of machine "a"`) {
		t.Fatalf("b's manifest replaced by a's: %v", err)
	}
}

// Segment metadata only steers a recovery to a time: a first_time moved
// earlier, which would make recover resolve the time inside that segment,
// is found out against the markers sealed in it.
func TestRecoverToTimeRefusesEditedMarkerTimes(t *testing.T) {
	m, t0 := journalOnly(t)
	edited := m.Segments[3] // markers from t0+60 s on
	b, err := m.Store.GetBlob(context.Background(), edited)
	if err != nil {
		t.Fatal(err)
	}
	info, err := m.Store.Stat(context.Background(), edited)
	if err != nil {
		t.Fatal(err)
	}
	at := t0.Add(50 * time.Second) // inside segment 2
	if _, res, err := recoverBytes(t, m, at.Format(time.RFC3339Nano), m.RecoveryKey); err != nil || res.Time.After(at) || res.Time.Before(t0.Add(40*time.Second)) {
		t.Fatalf("before the edit: %+v, %v", res, err)
	}
	info.Metadata[layout.MetaFirstTime] = strconv.FormatInt(t0.Add(45*time.Second).UnixNano(), 10)
	if err := m.Store.PutBlob(context.Background(), edited, b, info.Metadata); err != nil {
		t.Fatal(err)
	}
	_, res, err := recoverBytes(t, m, at.Format(time.RFC3339Nano), m.RecoveryKey)
	if !errors.Is(err, recovery.ErrTampered) || !strings.Contains(err.Error(), edited) {
		t.Fatalf("after moving %s's first_time earlier: %+v, %v; want ErrTampered naming it", edited, res, err)
	}
}

// A key blob that does not unwrap (junk, or altered) is skipped with a
// warning: what is sealed under the other keys still recovers, and what
// needed it says why it does not open.
func TestKeyBlobSkipped(t *testing.T) {
	m, _ := journalOnly(t)
	ctx := context.Background()
	junk := layout.KeyName(m.Name, [8]byte{1, 2, 3, 4, 5, 6, 7, 8})
	if err := m.Store.PutBlob(ctx, junk, []byte("not a wrapped key"), nil); err != nil {
		t.Fatal(err)
	}
	var warn strings.Builder
	path := filepath.Join(t.TempDir(), "out")
	req := recovery.Request{Machine: m.Name, Disk: "d0", Point: "latest", RecoveryKey: m.RecoveryKey, Progress: &warn}
	res, err := recovery.RecoverFile(ctx, m.Store, req, path)
	if err != nil {
		t.Fatalf("recover beside a junk key blob: %v", err)
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if res.Seq != m.Latest() || !bytes.Equal(got, m.Image(0, m.Latest())[:m.Disks[0].Size]) {
		t.Fatalf("recovered seq %d (want %d), or the image differs from the model", res.Seq, m.Latest())
	}
	if !strings.Contains(warn.String(), "skipped a data key") || !strings.Contains(warn.String(), junk) {
		t.Fatalf("no warning naming %s:\n%s", junk, warn.String())
	}
	warn.Reset()
	if _, _, _, err := recovery.VerifiedPoints(ctx, m.Store, m.Name, m.RecoveryKey, &warn); err != nil || !strings.Contains(warn.String(), junk) {
		t.Fatalf("points beside a junk key blob: %v\n%s", err, warn.String())
	}

	// The machine's own key altered, another good one present: the
	// manifest sealed under it does not open, and the error says why.
	material, id := seal.NewDataKey()
	wrapped, err := seal.WrapKey(m.RecoveryKey, material, id)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Store.PutBlob(ctx, layout.KeyName(m.Name, id), wrapped, nil); err != nil {
		t.Fatal(err)
	}
	own := layout.KeyName(m.Name, m.Key.ID())
	m.Tamper(own)
	_, err = recovery.RecoverFile(ctx, m.Store, req, path)
	if !errors.Is(err, seal.ErrUnknownKey) || !errors.Is(err, recovery.ErrTampered) || !strings.Contains(err.Error(), own) {
		t.Fatalf("recover with its key blob altered: %v", err)
	}
}

// TestRecoverFileNoReplace: a file that appears at the output path while
// the disk is recovered (a second recovery, someone's copy) is left as it
// is with NoReplace (recover without --force), and the recovered image
// kept beside it; without, replaced.
func TestRecoverFileNoReplace(t *testing.T) {
	m, _ := journalOnly(t)
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "out")
	appear := writerFunc(func(p []byte) (int, error) {
		if bytes.HasPrefix(p, []byte("syncing")) { // the last step before the rename
			return len(p), os.WriteFile(path, []byte("someone's"), 0o600)
		}
		return len(p), nil
	})
	req := recovery.Request{Machine: m.Name, Disk: "d0", Point: "latest", RecoveryKey: m.RecoveryKey, Progress: appear, NoReplace: true}
	_, err := recovery.RecoverFile(ctx, m.Store, req, path)
	if err == nil || !strings.Contains(err.Error(), "appeared") {
		t.Fatalf("recover onto a file that appeared meanwhile: %v", err)
	}
	if b, err := os.ReadFile(path); err != nil || string(b) != "someone's" {
		t.Fatalf("the file that appeared: %q, %v", b, err)
	}
	want := m.Image(0, m.Latest())[:m.Disks[0].Size]
	kept, _ := filepath.Glob(path + ".partial-*")
	if len(kept) != 1 {
		t.Fatalf("recovered image kept as %v, want one file", kept)
	}
	if b, err := os.ReadFile(kept[0]); err != nil || !bytes.Equal(b, want) {
		t.Fatalf("the kept image differs from the disk (%v)", err)
	}
	req.NoReplace = false
	if _, err := recovery.RecoverFile(ctx, m.Store, req, path); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(path); err != nil || !bytes.Equal(b, want) {
		t.Fatalf("replaced: the image differs from the disk (%v)", err)
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// pruning deletes the first journal segment a recovery's replay
// downloads (its second download: the first finds the latest marker),
// and raises journal_from unless byHand, as retention would while a long
// recovery reads.
type pruning struct {
	blobstore.Store
	m      *recoverytest.Machine
	byHand bool
	n      int
}

func (p *pruning) GetBlob(ctx context.Context, name string) ([]byte, error) {
	if strings.Contains(name, "/journal/") {
		if p.n++; p.n == 2 {
			if err := p.Store.DeleteBlob(ctx, name); err != nil {
				return nil, err
			}
			if !p.byHand {
				p.m.EditManifest(func(man *layout.Manifest) { man.JournalFrom = p.m.Latest() })
			}
		}
	}
	return p.Store.GetBlob(ctx, name)
}

// TestRecoverPrunedMeanwhile: retention deleting what a recovery reads
// (an old point's copy takes hours) is said as such: out of range, choose
// a newer point; not a bare "not found".
func TestRecoverPrunedMeanwhile(t *testing.T) {
	m, _ := journalOnly(t)
	store := &pruning{Store: m.Store, m: m}
	req := recovery.Request{Machine: m.Name, Disk: "d0", Point: "latest", RecoveryKey: m.RecoveryKey}
	_, err := recovery.RecoverFile(context.Background(), store, req, filepath.Join(t.TempDir(), "out"))
	if !errors.Is(err, recovery.ErrOutOfRange) || !strings.Contains(err.Error(), "retention moved") {
		t.Fatalf("recover while retention pruned what it read: %v, want ErrOutOfRange saying why", err)
	}
	// A segment deleted by hand, the window where it was: not retention.
	m2, _ := journalOnly(t)
	req.RecoveryKey = m2.RecoveryKey
	_, err = recovery.RecoverFile(context.Background(), &pruning{Store: m2.Store, m: m2, byHand: true}, req, filepath.Join(t.TempDir(), "out"))
	if !blobstore.IsNotFound(err) || errors.Is(err, recovery.ErrOutOfRange) {
		t.Fatalf("recover with a segment deleted by hand: %v, want it said as not found", err)
	}
}

// TestVerifiedUntilIgnoresSegmentMetadata: a segment's last_time is not
// authenticated; set later in the account, it must not move the
// recoverable_until that points --recovery-key reports (it would hide how
// far behind the journal is).
func TestVerifiedUntilIgnoresSegmentMetadata(t *testing.T) {
	m, t0 := journalOnly(t)
	ctx := context.Background()
	last := t0.Add(99 * time.Second) // journalOnly's last marker
	segs, err := recovery.ListSegments(ctx, m.Store, m.Name)
	if err != nil {
		t.Fatal(err)
	}
	newest := segs[len(segs)-1].Name
	info, err := m.Store.Stat(ctx, newest)
	if err != nil {
		t.Fatal(err)
	}
	info.Metadata[layout.MetaLastTime] = strconv.FormatInt(time.Date(2099, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano(), 10)
	if err := m.Store.SetMetadata(ctx, newest, info.Metadata); err != nil {
		t.Fatal(err)
	}
	_, until, _, err := recovery.VerifiedPoints(ctx, m.Store, m.Name, m.RecoveryKey, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if !until.Equal(last) {
		t.Fatalf("verified recoverable_until %v with a segment's last_time set to 2099, want %v (its last sealed marker)", until, last)
	}
}

// Latest is the marker the sealed recoverable_until dates: with the
// time metadata of the newest segments cleared (no key needed), it no
// longer resolves silently to an older marker; the segments that
// metadata calls undated are opened and the lie is reported.
func TestLatestNotSteeredByClearedMetadata(t *testing.T) {
	m, _ := journalOnly(t)
	ctx := context.Background()
	_, before, err := recoverBytes(t, m, "latest", m.RecoveryKey)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range m.Segments[2:] {
		b, err := m.Store.GetBlob(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		info, err := m.Store.Stat(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		delete(info.Metadata, layout.MetaFirstTime)
		delete(info.Metadata, layout.MetaLastTime)
		if err := m.Store.PutBlob(ctx, name, b, info.Metadata); err != nil {
			t.Fatal(err)
		}
	}
	_, after, err := recoverBytes(t, m, "latest", m.RecoveryKey)
	if !errors.Is(err, recovery.ErrTampered) {
		t.Fatalf("latest after the newest segments' times were cleared: seq %d (before: %d), err %v; want ErrTampered", after.Seq, before.Seq, err)
	}
}

// A disk whose journal needs more room than the output's file system has
// (the check before the copy counts the recovery point alone) fails with
// what is full and what to do, and leaves nothing there: the error named
// the partial file it had just removed.
func TestRecoverFileSystemFull(t *testing.T) {
	dir := testenv.Tmpfs(t, 1<<20)
	rng := rand.New(rand.NewPCG(21, 21))
	m := recoverytest.New(t, mem.New(), "full", 4<<20)
	m.Write(0, 0, randBytes(rng, 3<<20))
	m.Marker(wire.MarkerTime, time.Date(2025, 5, 1, 0, 0, 0, 0, time.UTC))
	m.Cut()
	_, err := recovery.RecoverFile(context.Background(), m.Store, recovery.Request{Machine: m.Name, Disk: "d0", Point: "latest", RecoveryKey: m.RecoveryKey}, filepath.Join(dir, "out.img"))
	if err == nil || !strings.Contains(err.Error(), "no room for the recovered disk in "+dir) || !strings.Contains(err.Error(), "recover elsewhere") || strings.Contains(err.Error(), ".partial-") {
		t.Fatalf("recover 3 MiB of journal into 1 MiB: %v", err)
	}
	if left, _ := os.ReadDir(dir); len(left) != 0 {
		t.Errorf("left in the full directory: %v", left)
	}
}
