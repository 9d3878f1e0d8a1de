package fsfreeze

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lifeboat-dr/lifeboat/internal/loopdev"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

// How long a write must stay blocked to count as "blocked by the freeze",
// and how long a write may take once thawed.
const (
	blockedFor = 300 * time.Millisecond
	unblockIn  = 5 * time.Second
)

func TestParseMountinfo(t *testing.T) {
	const mountinfo = `22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
90 27 7:0 / /mnt/with\040space rw - ext4 /dev/loop0 rw
91 27 7:0 /sub /srv/bind\134x rw - ext4 /dev/loop0 rw
92 27 7:1 / /mnt/other rw - ext4 /dev/loop1 rw
`
	got, err := parseMountinfo(strings.NewReader(mountinfo), map[string]bool{"7:0": true})
	if err != nil {
		t.Fatal(err)
	}
	want := []mount{{"/mnt/with space", unix.Mkdev(7, 0)}, {`/srv/bind\x`, unix.Mkdev(7, 0)}}
	if !slices.Equal(got, want) {
		t.Errorf("parseMountinfo = %v, want %v", got, want)
	}
}

// newExt4 mounts a fresh ext4 file system and returns its mount point. The
// cleanup thaws it first, in case a failing test left it frozen.
func newExt4(t *testing.T) (dev, dir string) {
	t.Helper()
	testenv.RequireTool(t, "mkfs.ext4")
	d := loopdev.New(t, 32<<20, loopdev.Options{})
	if err := loopdev.Mkfs(t.Context(), "ext4", d.Path); err != nil {
		t.Fatal(err)
	}
	dir = t.TempDir()
	if err := loopdev.Mount(d.Path, dir, "ext4", ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := loopdev.Unmount(dir); err != nil {
			t.Error(err)
		}
	})
	t.Cleanup(func() { Thaw(dir) })
	return d.Path, dir
}

// startWrite creates a file in dir from another goroutine and reports the
// result on the returned channel.
func startWrite(dir, name string) <-chan error {
	done := make(chan error, 1)
	go func() { done <- os.WriteFile(filepath.Join(dir, name), []byte(name), 0o644) }()
	return done
}

func assertBlocked(t *testing.T, done <-chan error) {
	t.Helper()
	select {
	case err := <-done:
		t.Fatalf("write to a frozen file system completed (err=%v)", err)
	case <-time.After(blockedFor):
	}
}

func assertCompletes(t *testing.T, done <-chan error) {
	t.Helper()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(unblockIn):
		t.Fatal("write still blocked after thaw")
	}
}

func TestMountsOf(t *testing.T) {
	dev, dir := newExt4(t)
	got, err := MountsOf(dev)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got, []string{dir}) {
		t.Errorf("MountsOf(%s) = %q, want [%s]", dev, got, dir)
	}
	if _, err := MountsOf(dir); err == nil || !strings.Contains(err.Error(), "not a block device") {
		t.Errorf("MountsOf(directory) error = %v", err)
	}
}

// A mount point of the device covered by another mount (a service's
// ProtectHome=tmpfs) is refused: a freeze through the path would freeze
// the file system on top, and the point would claim the one below.
func TestMountsOfCovered(t *testing.T) {
	dev, dir := newExt4(t)
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { loopdev.Unmount(dir) })
	if got, err := MountsOf(dev); err == nil || !strings.Contains(err.Error(), "covered by another mount") {
		t.Fatalf("MountsOf with its mount point covered = %q, %v; want an error", got, err)
	}
}

func TestFreezeBlocksWritesUntilThaw(t *testing.T) {
	_, dir := newExt4(t)
	if err := Freeze(dir); err != nil {
		t.Fatal(err)
	}
	done := startWrite(dir, "during-freeze")
	assertBlocked(t, done)
	if err := Freeze(dir); err == nil || !strings.Contains(err.Error(), "already frozen") {
		t.Errorf("second Freeze error = %v; want already frozen", err)
	}
	if err := Thaw(dir); err != nil {
		t.Fatal(err)
	}
	assertCompletes(t, done)
	if err := Thaw(dir); err == nil || !strings.Contains(err.Error(), "not frozen") {
		t.Errorf("Thaw of a thawed file system error = %v; want not frozen", err)
	}
}

// script writes an executable shell script that appends its name and
// arguments to log, then exits with code.
func script(t *testing.T, log, name string, code int) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	body := "#!/bin/sh\necho " + name + ` "$@" >>` + log + "\necho " + name + " says hello\nexit " + strconv.Itoa(code) + "\n"
	if err := os.WriteFile(path, []byte(body), 0o755); err != nil {
		t.Fatal(err)
	}
	return path
}

func readLog(t *testing.T, log string) string {
	t.Helper()
	b, err := os.ReadFile(log)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	return string(b)
}

func TestWithFrozen(t *testing.T) {
	_, dir := newExt4(t)
	log := filepath.Join(t.TempDir(), "log")
	pre, post := script(t, log, "pre", 0), script(t, log, "post", 0)

	var during <-chan error
	// The same file system twice (as with a bind mount) is frozen once.
	err := WithFrozen(t.Context(), []string{dir, dir}, pre, post, 10*time.Second, func() error {
		if got := readLog(t, log); got != "pre "+dir+" "+dir+"\n" {
			t.Errorf("log when fn runs = %q; want pre only", got)
		}
		during = startWrite(dir, "during")
		assertBlocked(t, during)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	assertCompletes(t, during)
	if got, want := readLog(t, log), "pre "+dir+" "+dir+"\npost "+dir+" "+dir+"\n"; got != want {
		t.Errorf("log = %q, want %q", got, want)
	}

	// fn's error is returned, and the thaw and post script still happen.
	boom := errors.New("boom")
	err = WithFrozen(t.Context(), []string{dir}, "", post, 0, func() error { return boom })
	if !errors.Is(err, boom) {
		t.Errorf("WithFrozen error = %v; want fn's error", err)
	}
	assertCompletes(t, startWrite(dir, "after-error"))
}

func TestWithFrozenWatchdog(t *testing.T) {
	_, dir := newExt4(t)
	log := filepath.Join(t.TempDir(), "log")
	post := script(t, log, "post", 0)

	// fn outlives the timeout; a write started inside it must complete
	// while fn is still running, because the watchdog thaws.
	err := WithFrozen(t.Context(), []string{dir}, "", post, 200*time.Millisecond, func() error {
		assertCompletes(t, startWrite(dir, "unblocked-by-watchdog"))
		return nil
	})
	if !errors.Is(err, ErrTimeout) {
		t.Errorf("WithFrozen error = %v; want ErrTimeout", err)
	}
	if got := readLog(t, log); got != "post "+dir+"\n" {
		t.Errorf("post script log = %q", got)
	}

	// Cancelling the context thaws early too.
	ctx, cancel := context.WithCancel(t.Context())
	time.AfterFunc(100*time.Millisecond, cancel)
	err = WithFrozen(ctx, []string{dir}, "", "", time.Minute, func() error {
		assertCompletes(t, startWrite(dir, "unblocked-by-cancel"))
		return nil
	})
	if !errors.Is(err, context.Canceled) {
		t.Errorf("WithFrozen error = %v; want context.Canceled", err)
	}
}

func TestWithFrozenFailures(t *testing.T) {
	_, dir := newExt4(t)
	log := filepath.Join(t.TempDir(), "log")
	called := false
	fn := func() error { called = true; return nil }

	// A failing pre script stops everything but the post script (which
	// may have to undo what it did); its output goes to the scripts' log,
	// not into the error, which the agent logs.
	out := filepath.Join(t.TempDir(), "scripts.log")
	w := Window{Mounts: []string{dir}, Pre: script(t, log, "pre", 3), Post: script(t, log, "post", 0), ScriptLog: out}
	err := w.Run(t.Context(), fn)
	if err == nil || !strings.Contains(err.Error(), "pre-freeze script") || !strings.Contains(err.Error(), out) || strings.Contains(err.Error(), "says hello") {
		t.Errorf("failing pre script: error = %v, want it naming %s, without the output", err, out)
	}
	if called || readLog(t, log) != "pre "+dir+"\npost "+dir+"\n" {
		t.Errorf("after failing pre: fn called=%v, log=%q", called, readLog(t, log))
	}
	if got := readLog(t, out); !strings.Contains(got, "pre says hello") || !strings.Contains(got, "post says hello") {
		t.Errorf("scripts' log = %q, want both scripts' output", got)
	}
	if fi, err := os.Stat(out); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("scripts' log mode %v (%v), want 0600", fi.Mode(), err)
	}
	os.Remove(log)

	// A file system that cannot be frozen (tmpfs) aborts before fn, after
	// thawing the ones already frozen; the post script still runs.
	tmp := t.TempDir()
	if err := unix.Mount("tmpfs", tmp, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	defer loopdev.Unmount(tmp)
	os.Remove(log)
	err = WithFrozen(t.Context(), []string{dir, tmp}, "", script(t, log, "post", 0), 0, fn)
	if err == nil || !strings.Contains(err.Error(), "does not support freezing") {
		t.Errorf("unfreezable mount: error = %v", err)
	}
	if called || readLog(t, log) != "post "+dir+" "+tmp+"\n" {
		t.Errorf("after freeze failure: fn called=%v, log=%q", called, readLog(t, log))
	}
	assertCompletes(t, startWrite(dir, "after-rollback"))
}

// TestWithFrozenUnmountDuringFreeze: an unmount while the file system is
// frozen (an operator, a test ending) used to succeed, and the thaw by
// mount point then reached the file system below and left this one
// frozen for good, its device busy and its next mount blocking every
// write. The descriptor that froze it holds the mount until the thaw.
func TestWithFrozenUnmountDuringFreeze(t *testing.T) {
	dev, dir := newExt4(t)
	err := WithFrozen(t.Context(), []string{dir}, "", "", 10*time.Second, func() error {
		if err := unix.Unmount(dir, 0); !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("unmount while frozen: %v, want EBUSY", err)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("WithFrozen: %v", err)
	}
	if err := loopdev.Unmount(dir); err != nil {
		t.Fatal(err)
	}
	if err := loopdev.Mount(dev, dir, "ext4", ""); err != nil {
		t.Fatal(err)
	}
	assertCompletes(t, startWrite(dir, "after-remount"))
}

// A whole disk's file systems live on its partitions: mountinfo names the
// partitions, never the disk, and MountsOf(disk) used to find nothing, so
// that app-consistent points of a protected disk froze nothing.
func TestMountsOfWholeDisk(t *testing.T) {
	testenv.RequireTool(t, "sfdisk")
	d := loopdev.New(t, 64<<20, loopdev.Options{PartScan: true})
	parts, err := loopdev.Partition(t.Context(), d.Path, loopdev.GPT, []loopdev.PartSpec{{Size: 16 << 20}, {}})
	if err != nil {
		t.Fatal(err)
	}
	if err := loopdev.Mkfs(t.Context(), "ext4", parts[1]); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := loopdev.Mount(parts[1], dir, "ext4", ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { loopdev.Unmount(dir) })
	for _, c := range []struct {
		dev  string
		want []string
	}{{d.Path, []string{dir}}, {parts[1], []string{dir}}, {parts[0], nil}} {
		got, err := MountsOf(c.dev)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got, c.want) {
			t.Errorf("MountsOf(%s) = %q, want %q", c.dev, got, c.want)
		}
	}
}

// The watchdog runs from the first freeze on: a later freeze that blocks
// (flushing a large dirty cache, a hung device) used to keep the file
// systems frozen before it frozen for as long, with no timer running.
func TestWatchdogCoversSlowFreeze(t *testing.T) {
	_, dir1 := newExt4(t)
	_, dir2 := newExt4(t)
	slow, entered := make(chan struct{}), make(chan struct{})
	freeze = func(fd int, m string) error {
		if m == dir2 {
			close(entered) // dir1 is frozen by now
			<-slow
		}
		return freezeFD(fd, m)
	}
	t.Cleanup(func() { freeze = freezeFD })
	done := make(chan error, 1)
	called := false
	go func() {
		done <- WithFrozen(t.Context(), []string{dir1, dir2}, "", "", 300*time.Millisecond, func() error {
			called = true
			return nil
		})
	}()
	// dir1 is frozen, dir2's freeze hangs: the watchdog must thaw dir1.
	<-entered
	assertCompletes(t, startWrite(dir1, "while-dir2-freezes"))
	close(slow)
	if err := <-done; !errors.Is(err, ErrTimeout) {
		t.Errorf("WithFrozen = %v, want ErrTimeout", err)
	}
	if called {
		t.Error("fn ran after the watchdog had thawed")
	}
	// The freeze that returned late was undone.
	assertCompletes(t, startWrite(dir2, "after-late-freeze"))
}

// A file system that cannot be frozen is synced and left out when the
// caller says so; the others are frozen as usual.
func TestUnfreezableSynced(t *testing.T) {
	_, dir := newExt4(t)
	tmp := t.TempDir()
	if err := unix.Mount("tmpfs", tmp, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	defer loopdev.Unmount(tmp)
	var skipped []string
	w := Window{Mounts: []string{tmp, dir}, Unfreezable: func(m string) { skipped = append(skipped, m) }}
	err := w.Run(t.Context(), func() error {
		assertBlocked(t, startWrite(dir, "frozen"))
		assertCompletes(t, startWrite(tmp, "not-frozen"))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(skipped, []string{tmp}) {
		t.Errorf("unfreezable = %q, want [%s]", skipped, tmp)
	}
	// Nothing held back at all is no point.
	w.Mounts = []string{tmp}
	called := false
	if err := w.Run(t.Context(), func() error { called = true; return nil }); err == nil || called {
		t.Errorf("only an unfreezable file system: Run = %v, fn called %v; want a refusal", err, called)
	}
}

// A pre script that leaves a child running in the background (a lock
// holder, as for FLUSH TABLES WITH READ LOCK) and exits 0 succeeds: its
// output goes to a file, which the child holding it open does not hold
// up. The scripts do not get the agent's NOTIFY_SOCKET.
func TestPreScriptBackgroundChild(t *testing.T) {
	_, dir := newExt4(t)
	t.Setenv("NOTIFY_SOCKET", "@lifeboat-test")
	tmp := t.TempDir()
	pre, bg, env := filepath.Join(tmp, "pre"), filepath.Join(tmp, "bg.pid"), filepath.Join(tmp, "env")
	if err := os.WriteFile(pre, []byte("#!/bin/sh\nenv >"+env+"\nsleep 30 &\necho $! >"+bg+"\necho locked\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if b, err := os.ReadFile(bg); err == nil {
			unix.Kill(atoi(t, strings.TrimSpace(string(b))), unix.SIGKILL)
		}
	})
	called := false
	start := time.Now()
	err := Window{Mounts: []string{dir}, Pre: pre, ScriptLog: filepath.Join(tmp, "scripts.log")}.Run(t.Context(), func() error { called = true; return nil })
	if err != nil || !called {
		t.Fatalf("Run = %v, fn called %v; want the point taken", err, called)
	}
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("Run waited %v for the background child", took)
	}
	if strings.Contains(readLog(t, env), "NOTIFY_SOCKET") {
		t.Error("the pre script got NOTIFY_SOCKET")
	}
}

// A file system thawed by someone else during the window (an operator's
// fsfreeze -u) fails the window with ErrThaw: writes went on meanwhile,
// so no app-consistent point may be claimed.
func TestThawedByOthers(t *testing.T) {
	_, dir := newExt4(t)
	err := Window{Mounts: []string{dir}}.Run(t.Context(), func() error { return Thaw(dir) })
	if !errors.Is(err, ErrThaw) {
		t.Fatalf("Run = %v, want ErrThaw", err)
	}
	assertCompletes(t, startWrite(dir, "after"))
}

// A pre script that hangs is killed, with what it started, and fails the
// freeze instead of holding the caller for good.
func TestPreScriptBounded(t *testing.T) {
	_, dir := newExt4(t)
	scriptTimeout = 300 * time.Millisecond
	t.Cleanup(func() { scriptTimeout = 2 * time.Minute })
	dir2 := t.TempDir()
	pre, bg := filepath.Join(dir2, "pre"), filepath.Join(dir2, "bg.pid")
	if err := os.WriteFile(pre, []byte("#!/bin/sh\nsleep 3600 &\necho $! >"+bg+"\nsleep 3600\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	called := false
	err := WithFrozen(t.Context(), []string{dir}, pre, "", 0, func() error { called = true; return nil })
	if err == nil || !strings.Contains(err.Error(), "pre-freeze script") {
		t.Errorf("WithFrozen = %v, want the pre script's failure", err)
	}
	if called {
		t.Error("fn ran after a failed pre script")
	}
	if took := time.Since(start); took > time.Minute {
		t.Errorf("a hung pre script held WithFrozen for %v", took)
	}
	// What it started in the background went with it.
	b, err := os.ReadFile(bg)
	if err != nil {
		t.Fatal(err)
	}
	pid := strings.TrimSpace(string(b))
	deadline := time.Now().Add(5 * time.Second)
	for {
		st, err := os.ReadFile("/proc/" + pid + "/stat")
		if err != nil || strings.Contains(string(st), ") Z ") {
			break // gone, or a zombie waiting for init
		}
		if time.Now().After(deadline) {
			unix.Kill(atoi(t, pid), unix.SIGKILL)
			t.Fatalf("the pre script's background child %s outlived it", pid)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func atoi(t *testing.T, s string) int {
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// The agent runs the scripts as root: one that another user could change,
// or swap through a directory they can write, is refused.
func TestCheckScripts(t *testing.T) {
	testenv.RequireRoot(t)
	dir := t.TempDir()
	good := filepath.Join(dir, "good")
	if err := os.WriteFile(good, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := CheckScripts("", good); err != nil {
		t.Fatalf("a root-owned script in a root-owned directory: %v", err)
	}
	owned := filepath.Join(dir, "owned")
	if err := os.WriteFile(owned, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(owned, 1000, 1000); err != nil {
		t.Fatal(err)
	}
	open := filepath.Join(dir, "open")
	if err := os.Mkdir(open, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(open, 0o777); err != nil {
		t.Fatal(err)
	}
	inOpen := filepath.Join(open, "s")
	if err := os.WriteFile(inOpen, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	notExec := filepath.Join(dir, "notexec")
	if err := os.WriteFile(notExec, []byte("#!/bin/sh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// A link from a root-only place to a script others could change.
	link := filepath.Join(dir, "link")
	if err := os.Symlink(inOpen, link); err != nil {
		t.Fatal(err)
	}
	// A name is looked up in PATH, as it is run.
	t.Setenv("PATH", dir)
	if err := CheckScripts("good"); err != nil {
		t.Errorf("a script found in PATH: %v", err)
	}
	for _, p := range []string{owned, inOpen, filepath.Join(dir, "missing"), notExec, dir, link, "nowhere"} {
		if err := CheckScripts(p); err == nil {
			t.Errorf("CheckScripts(%s) accepted it", p)
		}
	}
}

// ThawAll, for a process about to die of a second signal, thaws what a
// running Window froze, even while its operation still runs; the Window
// then fails with ErrThaw, claiming no consistent point.
func TestThawAll(t *testing.T) {
	_, dir := newExt4(t)
	t.Cleanup(func() { // the process is not stopping: later tests freeze again
		open.Lock()
		open.stopping = false
		open.Unlock()
	})
	inside, release := make(chan struct{}), make(chan struct{})
	result := make(chan error, 1)
	go func() {
		result <- Window{Mounts: []string{dir}, Timeout: time.Minute}.Run(t.Context(), func() error {
			close(inside)
			<-release
			return nil
		})
	}()
	<-inside
	during := startWrite(dir, "during")
	assertBlocked(t, during)
	ThawAll(10 * time.Second)
	assertCompletes(t, during)
	close(release)
	if err := <-result; !errors.Is(err, ErrThaw) {
		t.Fatalf("Run after ThawAll = %v, want ErrThaw", err)
	}
	ThawAll(time.Second) // nothing open: returns at once
	// The process is stopping: a Window started now freezes nothing.
	err := Window{Mounts: []string{dir}}.Run(t.Context(), func() error {
		assertCompletes(t, startWrite(dir, "after-thawall"))
		return nil
	})
	if !errors.Is(err, ErrThaw) {
		t.Fatalf("Run after ThawAll = %v, want ErrThaw", err)
	}
}

// OnThaw runs when the file systems are thawed, also by the watchdog
// while fn still runs: fn may be waiting for what only the thaw lets
// happen (an agent's drain for acks behind a state save).
func TestOnThawFromWatchdog(t *testing.T) {
	_, dir := newExt4(t)
	thawed := make(chan struct{})
	calls := 0
	w := Window{Mounts: []string{dir}, Timeout: 200 * time.Millisecond, OnThaw: func() { calls++; close(thawed) }}
	err := w.Frozen(t.Context(), func() error {
		select {
		case <-thawed:
			return nil
		case <-time.After(10 * time.Second):
			return errors.New("OnThaw not called while fn ran past the watchdog")
		}
	})
	if !errors.Is(err, ErrTimeout) {
		t.Fatalf("Frozen = %v, want ErrTimeout from the watchdog", err)
	}
	if calls != 1 {
		t.Fatalf("OnThaw called %d times, want once", calls)
	}
	// And at the end of fn, when no watchdog fired.
	n := 0
	if err := (Window{Mounts: []string{dir}, OnThaw: func() { n++ }}).Frozen(t.Context(), func() error { return nil }); err != nil || n != 1 {
		t.Fatalf("Frozen = %v, OnThaw called %d times; want nil, once", err, n)
	}
}

// A mount point of the device that leads to another file system is
// refused, by MountsOf and by a Window given the device, however it was
// covered: a file system mounted later on a directory above it, or one
// mounted before it and moved over it (listed first in mountinfo, so not
// seen as a cover there). Before, the window froze the file system on top
// and succeeded: an app-consistent point that froze nothing of the
// device's.
func TestMountsOfCoveredAbove(t *testing.T) {
	for _, how := range []string{"parent", "moved"} {
		t.Run(how, func(t *testing.T) {
			prot, pdir := newExt4(t)
			_, odir := newExt4(t)
			base := t.TempDir()
			var point string
			switch how {
			case "parent":
				point = filepath.Join(base, "a", "b")
				if err := os.MkdirAll(point, 0o755); err != nil {
					t.Fatal(err)
				}
				if err := unix.Mount(pdir, point, "", unix.MS_BIND, ""); err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { loopdev.Unmount(point) })
				outer := filepath.Join(base, "a")
				if err := unix.Mount(odir, outer, "", unix.MS_BIND, ""); err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { loopdev.Unmount(outer) })
				if err := os.MkdirAll(point, 0o755); err != nil { // on the other file system
					t.Fatal(err)
				}
			case "moved":
				staging := filepath.Join(base, "staging")
				point = filepath.Join(base, "data")
				for _, d := range []string{staging, point} {
					if err := os.Mkdir(d, 0o755); err != nil {
						t.Fatal(err)
					}
				}
				if err := unix.Mount(odir, staging, "", unix.MS_BIND, ""); err != nil { // created first
					t.Fatal(err)
				}
				if err := unix.Mount(pdir, point, "", unix.MS_BIND, ""); err != nil {
					loopdev.Unmount(staging)
					t.Fatal(err)
				}
				t.Cleanup(func() { loopdev.Unmount(point) })
				if err := unix.Mount(staging, point, "", unix.MS_MOVE, ""); err != nil {
					loopdev.Unmount(staging)
					t.Fatal(err)
				}
				t.Cleanup(func() { loopdev.Unmount(point) }) // the cover, first
			}
			if got, err := MountsOf(prot); err == nil || !strings.Contains(err.Error(), "leads to another file system") {
				t.Fatalf("MountsOf with %s covered = %q, %v; want an error", point, got, err)
			}
			ran := false
			err := Window{Devices: []string{prot}}.Run(t.Context(), func() error { ran = true; return nil })
			if err == nil || ran {
				t.Fatalf("a window on %s, its mount point covered, ran its operation (%v): it froze the other file system", prot, err)
			}
		})
	}
}

// A loop device attached to the protected device carries a file system
// whose writes reach it: found (loop registers under no holders/).
func TestMountsOfLoopOnDevice(t *testing.T) {
	testenv.RequireTool(t, "mkfs.ext4")
	d := loopdev.New(t, 64<<20, loopdev.Options{})
	up, err := loopdev.Attach(d.Path, loopdev.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { up.Detach() })
	if err := loopdev.Mkfs(t.Context(), "ext4", up.Path); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := loopdev.Mount(up.Path, dir, "ext4", ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { loopdev.Unmount(dir) })
	got, err := MountsOf(d.Path)
	if err != nil || !slices.Contains(got, dir) {
		t.Fatalf("MountsOf(%s) = %q, %v: want %s, mounted from %s, a loop device on it", d.Path, got, err, dir, up.Path)
	}
}

// A child a pre script leaves running (a lock holder, released by the
// post script) is killed by KillScripts, as a second SIGINT or SIGTERM
// calls it: the post script never runs then. Once the post script has
// started, the pre script's group is no longer the agent's to kill.
func TestKillScriptsKillsWhatPreLeft(t *testing.T) {
	dir := t.TempDir()
	holder := func(name string) (string, string) {
		pidFile := filepath.Join(dir, name+".pid")
		pre := filepath.Join(dir, name)
		body := "#!/bin/sh\nsleep 300 &\necho $! > " + pidFile + "\nexit 0\n"
		if err := os.WriteFile(pre, []byte(body), 0o755); err != nil {
			t.Fatal(err)
		}
		return pre, pidFile
	}
	alive := func(pidFile string) (int, bool) {
		b, err := os.ReadFile(pidFile)
		if err != nil {
			t.Fatal(err)
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil {
			t.Fatal(err)
		}
		st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		// Killed, it is gone or a zombie until init reaps it.
		return pid, err == nil && !strings.Contains(string(st), ") Z ")
	}
	pre, pidFile := holder("pre")
	if err := (Window{Pre: pre}).RunPre(t.Context()); err != nil {
		t.Fatal(err)
	}
	pid, ok := alive(pidFile)
	if !ok {
		t.Fatal("the pre script's child is not running")
	}
	t.Cleanup(func() { syscall.Kill(pid, syscall.SIGKILL) })
	KillScripts()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, ok := alive(pidFile); !ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the pre script's child %d still runs after KillScripts", pid)
		}
	}

	pre2, pidFile2 := holder("pre2")
	w := Window{Pre: pre2}
	if err := w.RunPre(t.Context()); err != nil {
		t.Fatal(err)
	}
	if err := w.RunPost(t.Context()); err != nil {
		t.Fatal(err)
	}
	pid2, _ := alive(pidFile2)
	t.Cleanup(func() { syscall.Kill(pid2, syscall.SIGKILL) })
	KillScripts()
	time.Sleep(100 * time.Millisecond)
	if _, ok := alive(pidFile2); !ok {
		t.Fatal("KillScripts killed a pre script's child after its post script ran")
	}
}
