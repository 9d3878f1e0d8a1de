package perf

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

func TestIOCgroupRoot(t *testing.T) {
	v2root := t.TempDir()
	if err := os.WriteFile(filepath.Join(v2root, "cgroup.subtree_control"), []byte("cpu io memory\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	noIO := t.TempDir()
	if err := os.WriteFile(filepath.Join(noIO, "cgroup.subtree_control"), []byte("cpu memory\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name, mountinfo, want string
	}{
		{"v1 hybrid", `25 30 0:23 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
31 25 0:29 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
32 25 0:30 / /sys/fs/cgroup/blkio rw,nosuid shared:9 - cgroup cgroup rw,blkio
`, "/sys/fs/cgroup/blkio"},
		{"v1 blkio seen from a container's cgroup", `32 25 0:30 /docker/abc /sys/fs/cgroup/blkio rw - cgroup cgroup rw,blkio
`, ""},
		{"v2 with io delegated", `26 25 0:24 / ` + noIO + ` rw - cgroup2 cgroup2 rw
27 25 0:25 / ` + v2root + ` rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
`, v2root},
		{"v2 without io", `26 25 0:24 / ` + noIO + ` rw - cgroup2 cgroup2 rw
`, ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := filepath.Join(t.TempDir(), "mountinfo")
			if err := os.WriteFile(f, []byte(c.mountinfo), 0o644); err != nil {
				t.Fatal(err)
			}
			got, err := ioCgroupRoot(f)
			if c.want == "" {
				if err == nil || !strings.Contains(err.Error(), "io (v2) controller") {
					t.Fatalf("got %q, %v; want an error naming the missing controller", got, err)
				}
				return
			}
			if err != nil || got != c.want {
				t.Fatalf("got %q, %v; want %q", got, err, c.want)
			}
		})
	}
}

// The agent under benchmark lands in the cgroup, all threads, and the
// cgroup goes away after it.
func TestIOCgroupMovesProcess(t *testing.T) {
	testenv.RequireRoot(t)
	if _, err := ioCgroupRoot("/proc/self/mountinfo"); err != nil {
		if testenv.InCI() {
			t.Fatalf("CI must run this test: %v", err)
		}
		t.Skipf("no block I/O cgroup hierarchy here: %v", err)
	}
	cg, err := newIOCgroup(strconv.Itoa(os.Getpid()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cg.remove() })
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Wait()
	defer cmd.Process.Kill()
	if err := cg.add(cmd.Process.Pid); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), "/"+filepath.Base(cg.path())+"\n") {
		t.Fatalf("process not in %s:\n%s", cg.path(), b)
	}
	cmd.Process.Kill()
	cmd.Wait()
	if err := cg.remove(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(cg.path()); !os.IsNotExist(err) {
		t.Fatalf("%s still there: %v", cg.path(), err)
	}
}
