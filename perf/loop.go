package perf

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// attachLoop creates a sparse file of size bytes at path and attaches it to
// a free loop device, returning the device path. --direct-io=off keeps the
// backing file in the page cache so the benchmark measures the capture path,
// not the backing disk.
func attachLoop(ctx context.Context, path string, size int64) (string, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return "", fmt.Errorf("create loop backing file: %w", err)
	}
	err = f.Truncate(size)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		return "", fmt.Errorf("size loop backing file: %w", err)
	}
	out, err := exec.CommandContext(ctx, "losetup", "--find", "--show", "--direct-io=off", path).CombinedOutput()
	if err != nil {
		os.Remove(path)
		return "", fmt.Errorf("losetup --find %s: %w: %s", path, err, strings.TrimSpace(string(out)))
	}
	dev := strings.TrimSpace(string(out))
	if !strings.HasPrefix(dev, "/dev/") {
		os.Remove(path)
		return "", fmt.Errorf("losetup --find %s: unexpected output %q", path, dev)
	}
	return dev, nil
}

// detachLoop detaches dev and removes its backing file. It deliberately
// ignores the caller's context: cleanup must run after cancellation too.
func detachLoop(dev, path string) error {
	var errs []string
	if out, err := exec.Command("losetup", "--detach", dev).CombinedOutput(); err != nil {
		errs = append(errs, fmt.Sprintf("losetup --detach %s: %v: %s", dev, err, strings.TrimSpace(string(out))))
	} else if err := waitDetached(dev, detachTimeout); err != nil {
		errs = append(errs, err.Error())
	}
	if err := os.Remove(path); err != nil {
		errs = append(errs, err.Error())
	}
	if len(errs) > 0 {
		return fmt.Errorf("clean up loop device: %s", strings.Join(errs, "; "))
	}
	return nil
}

// detachTimeout bounds how long detachLoop waits for a busy device to go.
const detachTimeout = 10 * time.Second

// waitDetached waits until dev no longer has a backing file. losetup
// --detach on a device that is still open (io_uring tears its rings down
// asynchronously after fio exits, in-flight writes keep the device open)
// only marks it for auto-clear, so the next sample could otherwise start
// while the previous device is still bound.
func waitDetached(dev string, timeout time.Duration) error {
	bf := filepath.Join("/sys/block", filepath.Base(dev), "loop", "backing_file")
	deadline := time.Now().Add(timeout)
	for {
		if _, err := os.Stat(bf); errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s still attached %s after losetup --detach (busy); it detaches automatically when released", dev, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
