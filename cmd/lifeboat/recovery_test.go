package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/azurite"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/azure"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/recovery"
	"github.com/lifeboat-dr/lifeboat/internal/recovery/recoverytest"
	"github.com/lifeboat-dr/lifeboat/internal/seal"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
	"github.com/lifeboat-dr/lifeboat/processserver/applier"
	"github.com/spf13/cobra"
)

func runCmd(t *testing.T, cmd *cobra.Command, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	var o, e bytes.Buffer
	cmd.SetArgs(args)
	cmd.SetOut(&o)
	cmd.SetErr(&e)
	cmd.SilenceUsage, cmd.SilenceErrors = true, true
	err = cmd.ExecuteContext(context.Background())
	return o.String(), e.String(), err
}

// TestPointsAndRecoverCommands drives `lifeboat points` and `lifeboat
// recover` against Azurite holding an applied journal.
func TestPointsAndRecoverCommands(t *testing.T) {
	srv := azurite.ForTest(t)
	container := fmt.Sprintf("lbcli-%d", time.Now().UnixNano()%1e9)
	store, err := azure.New(azure.Config{ConnectionString: srv.ConnectionString(), Container: container})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = store.DeleteContainer(context.Background()) })
	t.Setenv(recoveryAccountEnv, srv.ConnectionString())

	rng := rand.New(rand.NewPCG(1, 2))
	m := recoverytest.New(t, store, "web1", 1<<20+512, 64<<10, 64<<10)
	t0 := time.Date(2025, 6, 1, 8, 0, 0, 0, time.UTC)
	data := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		return b
	}
	for i := range 30 {
		m.Write(0, uint64(rng.IntN(1<<20)), data(1+rng.IntN(9000)))
		if i == 10 {
			m.Marker(wire.MarkerAppConsistent, t0.Add(time.Duration(i)*time.Second))
		} else {
			m.Marker(wire.MarkerTime, t0.Add(time.Duration(i)*time.Second))
		}
		if i%10 == 9 {
			m.Cut()
		}
	}
	a, err := applier.New(applier.Config{Store: store, Keys: applier.RecoveryKeys(store, m.RecoveryKey), PointInterval: 5 * time.Second, Retention: -1})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Apply(context.Background(), m.Name); err != nil {
		t.Fatal(err)
	}

	out, _, err := runCmd(t, pointsCmd(new(bool)), "--machine", "web1", "--container", container)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("lifeboat points:\n%s", out)
	if !strings.Contains(out, "KIND") || !strings.Contains(out, "app") || !strings.Contains(out, "recoverable until: 2025-06-01T08:00:29Z") ||
		!strings.Contains(out, "DISKS") || !strings.Contains(out, " all\n") {
		t.Fatalf("points output:\n%s", out)
	}
	out, _, err = runCmd(t, pointsCmd(new(bool)), "--machine", "web1", "--container", container, "--json")
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Disks []struct {
			Name string
			Size uint64
		}
		Points []struct {
			Kind  string
			Seq   uint64
			Disks []string
		}
		RecoverableUntil string `json:"recoverable_until"`
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil || len(doc.Points) < 2 || doc.RecoverableUntil != "2025-06-01T08:00:29Z" {
		t.Fatalf("points --json: %v\n%s", err, out)
	}
	if len(doc.Disks) != 3 || doc.Disks[0].Name != "d0" || doc.Disks[0].Size != 1<<20+512 || doc.Disks[2].Name != "d2" {
		t.Fatalf("points --json disks %+v, want d0 (1 MiB + 512 B), d1, d2", doc.Disks)
	}
	for _, p := range doc.Points { // in the manifest's order, every time
		if !slices.Equal(p.Disks, []string{"d0", "d1", "d2"}) {
			t.Fatalf("point %d lists disks %v, want d0, d1, d2", p.Seq, p.Disks)
		}
	}
	// The machines the container holds, and what a wrong name or
	// container gets.
	if out, _, err = runCmd(t, machinesCmd(new(bool)), "--container", container); err != nil ||
		!strings.Contains(out, "MACHINE") || !strings.Contains(out, "web1") || !strings.Contains(out, "d0 (1.0 MiB)") || !strings.Contains(out, "2025-06-01T08:00:29Z") {
		t.Fatalf("machines: %v\n%s", err, out)
	}
	var machines []struct {
		Machine          string
		Disks            []struct{ Name string }
		RecoverableUntil string `json:"recoverable_until"`
	}
	if out, _, err = runCmd(t, machinesCmd(new(bool)), "--container", container, "--json"); err != nil || json.Unmarshal([]byte(out), &machines) != nil ||
		len(machines) != 1 || machines[0].Machine != "web1" || len(machines[0].Disks) != 3 || machines[0].RecoverableUntil != "2025-06-01T08:00:29Z" {
		t.Fatalf("machines --json: %v\n%s", err, out)
	}
	// A manifest that does not parse leaves that machine out, not the list.
	if err := store.PutBlob(context.Background(), layout.ManifestName("bad"), []byte("{"), nil); err != nil {
		t.Fatal(err)
	}
	if out, errOut, err := runCmd(t, machinesCmd(new(bool)), "--container", container); err != nil || !strings.Contains(out, "web1") || !strings.Contains(errOut, "machine bad left out") {
		t.Fatalf("machines beside a broken manifest: %v\n%s%s", err, out, errOut)
	}
	if err := store.DeleteBlob(context.Background(), layout.ManifestName("bad")); err != nil {
		t.Fatal(err)
	}
	if _, _, err = runCmd(t, pointsCmd(new(bool)), "--machine", "web2", "--container", container); err == nil || !strings.Contains(err.Error(), "lifeboat machines lists") {
		t.Fatalf("points of a machine the container does not hold: %v", err)
	}
	for _, cmd := range []*cobra.Command{pointsCmd(new(bool)), machinesCmd(new(bool))} {
		args := []string{"--container", "nosuch"}
		if cmd.Name() == "points" {
			args = append(args, "--machine", "web1")
		}
		if _, _, err = runCmd(t, cmd, args...); err == nil || !strings.Contains(err.Error(), "container does not exist") {
			t.Fatalf("%s of a container the account does not hold: %v", cmd.Name(), err)
		}
	}

	// A recorded gap is shown, and not only in JSON.
	m.EditManifest(func(man *layout.Manifest) {
		man.Gaps = []layout.Gap{{From: 1000, LostTo: 1010, Mended: 1020, Unmended: []layout.UnmendedDisk{{Name: "d2"}, {Name: "d1", Until: 1500}}}}
	})
	if out, _, err = runCmd(t, pointsCmd(new(bool)), "--machine", "web1", "--container", container); err != nil ||
		!strings.Contains(out, "disks: d0 (1.0 MiB), d1 (") ||
		!strings.Contains(out, "journal gap: seq 1000 to 1019 not recoverable") ||
		!strings.Contains(out, "disk d2: not recoverable from seq 1000 until its next full sync") ||
		!strings.Contains(out, "disk d1: not recoverable from seq 1000 to 1499") {
		t.Fatalf("points with a gap: %v\n%s", err, out)
	}

	// A disk added after a point is not listed at it: recover refuses it
	// there.
	second, was := doc.Points[1].Seq, m.Disks[2].GenerationStart
	m.EditManifest(func(man *layout.Manifest) { man.Disks[2].GenerationStart = second })
	if out, _, err = runCmd(t, pointsCmd(new(bool)), "--machine", "web1", "--container", container, "--json"); err != nil || json.Unmarshal([]byte(out), &doc) != nil {
		t.Fatalf("points --json: %v\n%s", err, out)
	}
	if !slices.Equal(doc.Points[0].Disks, []string{"d0", "d1"}) || !slices.Equal(doc.Points[1].Disks, []string{"d0", "d1", "d2"}) {
		t.Fatalf("points --json with d2 protected from seq %d: %+v", second, doc.Points)
	}
	if out, _, err = runCmd(t, pointsCmd(new(bool)), "--machine", "web1", "--container", container); err != nil ||
		strings.Count(out, "all but d2 (not protected yet)") != 1 {
		t.Fatalf("points with d2 protected from seq %d: %v\n%s", second, err, out)
	}
	m.EditManifest(func(man *layout.Manifest) { man.Disks[2].GenerationStart = was })

	dir := t.TempDir()
	keyFile := filepath.Join(dir, "recovery.key")
	if err := seal.WriteRecoveryKey(keyFile, m.RecoveryKey); err != nil {
		t.Fatal(err)
	}
	// With the key, the points recover would use: all of them, then one
	// fewer once the first one's record is gone.
	verified := func() (int, string) {
		t.Helper()
		out, errOut, err := runCmd(t, pointsCmd(new(bool)), "--machine", "web1", "--container", container, "--json", "--recovery-key", keyFile)
		var v struct{ Points []struct{ Seq uint64 } }
		if err != nil || json.Unmarshal([]byte(out), &v) != nil {
			t.Fatalf("points --recovery-key: %v\n%s%s", err, out, errOut)
		}
		return len(v.Points), errOut
	}
	if n, _ := verified(); n != len(doc.Points) {
		t.Fatalf("points --recovery-key lists %d points, want all %d", n, len(doc.Points))
	}
	for _, kind := range []string{"crash", "app"} {
		store.DeleteBlob(context.Background(), layout.PointRecordName("web1", fmt.Sprintf("%020d", doc.Points[0].Seq), kind))
	}
	if n, errOut := verified(); n != len(doc.Points)-1 || !strings.Contains(errOut, fmt.Sprintf("recovery point at seq %d:", doc.Points[0].Seq)) {
		t.Fatalf("points --recovery-key without the first point's record: %d points (want %d), said:\n%s", n, len(doc.Points)-1, errOut)
	}
	img := filepath.Join(dir, "web1-d0.img")
	at := t0.Add(15*time.Second + 300*time.Millisecond).Format(time.RFC3339Nano)
	for _, tc := range []struct {
		point string
		seq   uint64
	}{{"latest", m.Latest()}, {at, m.Markers()[15].Seq}} {
		out, errOut, err := runCmd(t, recoverCmd(new(bool)), "--machine", "web1", "--disk", "d0", "--point", tc.point,
			"--to", img, "--recovery-key", keyFile, "--container", container, "--force")
		if err != nil {
			t.Fatalf("recover %s: %v\n%s", tc.point, err, errOut)
		}
		t.Logf("recover %s: %s%s", tc.point, errOut, out)
		if !strings.Contains(errOut, "recovering disk d0 of machine web1") || !strings.Contains(out, fmt.Sprintf("at sequence %d", tc.seq)) {
			t.Fatalf("recover %s: stdout %q stderr %q", tc.point, out, errOut)
		}
		got, err := os.ReadFile(img)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, m.Image(0, tc.seq)) {
			t.Fatalf("recover %s: image differs from the disk at seq %d", tc.point, tc.seq)
		}
	}

	// An existing file is replaced only with --force; a mistyped point is
	// refused before the account is read.
	before, _ := os.ReadFile(img)
	if _, _, err := runCmd(t, recoverCmd(new(bool)), "--machine", "web1", "--disk", "d0", "--to", img, "--recovery-key", keyFile, "--container", container); err == nil || !strings.Contains(err.Error(), "give --force") {
		t.Fatalf("recover over an existing file: %v", err)
	}
	if after, _ := os.ReadFile(img); !bytes.Equal(before, after) {
		t.Fatal("the existing file changed")
	}
	t.Setenv(recoveryAccountEnv, "") // no account: the point is checked first
	if _, _, err := runCmd(t, recoverCmd(new(bool)), "--machine", "web1", "--disk", "d0", "--point", "yesterday", "--to", filepath.Join(dir, "y"), "--recovery-key", keyFile); err == nil || !strings.Contains(err.Error(), `point "yesterday"`) {
		t.Fatalf("recover --point yesterday: %v", err)
	}
	t.Setenv(recoveryAccountEnv, srv.ConnectionString())

	// A sequence between markers is refused, naming the marker before
	// it; with --any-sequence it is recovered as given.
	prevMarker := m.Latest()
	m.Write(0, 4096, data(3000))
	between := prevMarker + 1 // that write's
	m.Write(0, 8192, data(3000))
	m.Marker(wire.MarkerTime, t0.Add(30*time.Second))
	m.Cut()
	recoverSeq := func(seq uint64, args ...string) (string, error) {
		out, errOut, err := runCmd(t, recoverCmd(new(bool)), append([]string{"--machine", "web1", "--disk", "d0", "--point", fmt.Sprint(seq),
			"--to", img, "--recovery-key", keyFile, "--container", container, "--force"}, args...)...)
		return out + errOut, err
	}
	if out, err := recoverSeq(between); !errors.Is(err, recovery.ErrOutOfRange) || !strings.Contains(err.Error(), "not at a consistency marker") ||
		!strings.Contains(err.Error(), fmt.Sprintf("the nearest before it: %d", prevMarker)) {
		t.Fatalf("recover --point %d (between markers %d and %d): %v\n%s", between, prevMarker, m.Latest(), err, out)
	}
	for _, tc := range []struct {
		seq  uint64
		args []string
	}{{m.Latest(), nil}, {between, []string{"--any-sequence"}}} {
		if out, err := recoverSeq(tc.seq, tc.args...); err != nil {
			t.Fatalf("recover --point %d %v: %v\n%s", tc.seq, tc.args, err, out)
		}
		if got, err := os.ReadFile(img); err != nil || !bytes.Equal(got, m.Image(0, tc.seq)) {
			t.Fatalf("recover --point %d %v: image differs from the disk at that sequence (%v)", tc.seq, tc.args, err)
		}
	}

	// Wrong key and a tampered segment fail with clear errors.
	other := filepath.Join(dir, "other.key")
	if err := seal.WriteRecoveryKey(other, seal.NewRecoveryKey()); err != nil {
		t.Fatal(err)
	}
	_, _, err = runCmd(t, recoverCmd(new(bool)), "--machine", "web1", "--disk", "d0", "--to", filepath.Join(dir, "x"), "--recovery-key", other, "--container", container)
	if err == nil || !strings.Contains(err.Error(), "wrong recovery key") {
		t.Fatalf("wrong key: %v", err)
	}
	m.Tamper(m.Segments[2])
	bad := filepath.Join(dir, "bad.img")
	_, _, err = runCmd(t, recoverCmd(new(bool)), "--machine", "web1", "--disk", "d0", "--to", bad, "--recovery-key", keyFile, "--container", container)
	if err == nil || !strings.Contains(err.Error(), m.Segments[2]) || !strings.Contains(err.Error(), "not written") || !strings.Contains(err.Error(), "does not need it") {
		t.Fatalf("tampered segment: %v", err)
	}
	t.Logf("tampered: %v", err)
	if _, err := os.Stat(bad); !os.IsNotExist(err) {
		t.Fatalf("%s exists after a failed recovery", bad)
	}
}
