package perf

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// ioCgroup is a block I/O cgroup made for the agent under benchmark.
//
// Installed as a service, the agent has its own cgroup (systemd gives every
// unit one; on cgroup v1 the blkio one with IOAccounting=yes, as
// deploy/lifeboat-agent.service sets), while the workload it protects
// runs in others. The loop driver serves each block cgroup with its own
// worker thread: an agent sharing fio's cgroup queues its read-back behind
// fio's writes in one worker, a cost a service on a real disk does not
// have. The benchmark therefore runs the agent in a cgroup of its own.
type ioCgroup struct {
	dir string
}

// benchCgroupPrefix starts the names of the cgroups benchmarks make.
const benchCgroupPrefix = "lifeboat-bench-agent-"

// newIOCgroup creates an empty cgroup named benchCgroupPrefix+suffix at the
// root of the hierarchy that holds the io (v2) or blkio (v1) controller,
// after removing the empty ones earlier runs left (killed before their
// cleanup).
func newIOCgroup(suffix string) (*ioCgroup, error) {
	root, err := ioCgroupRoot("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	stale, _ := filepath.Glob(filepath.Join(root, benchCgroupPrefix+"*"))
	for _, d := range stale {
		// Named by the pid of the run that made it: only a dead run's.
		pid, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(d), benchCgroupPrefix))
		if err == nil && syscall.Kill(pid, 0) == nil {
			continue
		}
		os.Remove(d) // fails, as it should, while processes are in it
	}
	dir := filepath.Join(root, benchCgroupPrefix+suffix)
	if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return nil, fmt.Errorf("create block I/O cgroup: %w", err)
	}
	return &ioCgroup{dir: dir}, nil
}

// path is the cgroup's directory, "" for nil (the harness's own cgroup).
func (c *ioCgroup) path() string {
	if c == nil {
		return ""
	}
	return c.dir
}

// add moves process pid, all its threads, into the cgroup.
func (c *ioCgroup) add(pid int) error {
	if err := os.WriteFile(filepath.Join(c.dir, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0); err != nil {
		return fmt.Errorf("move agent into block I/O cgroup %s: %w", c.dir, err)
	}
	return nil
}

// remove deletes the cgroup once its processes have exited (the kernel
// may take a moment after the exit to let go of it).
func (c *ioCgroup) remove() error {
	var err error
	for range 50 {
		if err = os.Remove(c.dir); err == nil || errors.Is(err, os.ErrNotExist) {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("remove block I/O cgroup: %w", err)
}

// ioCgroupRoot finds, in a mountinfo file, the root of the cgroup v1
// hierarchy with the blkio controller or else a cgroup v2 hierarchy whose
// root delegates the io controller to its children.
func ioCgroupRoot(mountinfo string) (string, error) {
	f, err := os.Open(mountinfo)
	if err != nil {
		return "", err
	}
	defer f.Close()
	var v2 []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// id parent major:minor root mountpoint options [optional...] - fstype source superoptions
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if !ok {
			continue
		}
		fields, tail := strings.Fields(pre), strings.Fields(post)
		if len(fields) < 5 || len(tail) < 3 || fields[3] != "/" {
			continue // not a hierarchy's root (e.g. a container's view)
		}
		switch tail[0] {
		case "cgroup":
			if slices.Contains(strings.Split(tail[2], ","), "blkio") {
				return fields[4], nil
			}
		case "cgroup2":
			v2 = append(v2, fields[4])
		}
	}
	if err := sc.Err(); err != nil {
		return "", err
	}
	for _, root := range v2 {
		ctl, err := os.ReadFile(filepath.Join(root, "cgroup.subtree_control"))
		if err == nil && slices.Contains(strings.Fields(string(ctl)), "io") {
			return root, nil
		}
	}
	return "", errors.New("no cgroup hierarchy with the blkio (v1) or io (v2) controller enabled")
}
