package perf

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Notification assignments the harness waits for. readyMsg is the standard
// sd_notify readiness message; syncedMsg is Lifeboat's own extension sent
// when the agent's initial device copy is done.
const (
	readyMsg  = "READY=1"
	syncedMsg = "X-LIFEBOAT-SYNCED=1"
)

// errChildExited is returned by notifyListener.wait when the child exits
// before sending the awaited assignment.
var errChildExited = errors.New("process exited")

// notifyListener receives sd_notify datagrams on a unixgram socket.
type notifyListener struct {
	path string
	conn *net.UnixConn
	log  *slog.Logger
	msgs chan string
	// seen holds every assignment received so far, so a message that
	// arrives early or bundled with another (e.g. READY=1 and
	// X-LIFEBOAT-SYNCED=1 in one datagram) is not lost. Only wait touches it.
	seen map[string]bool
}

// listenNotify creates the socket "notify.sock" in dir, which must be private
// to the caller (any local process able to reach it can fake readiness).
func listenNotify(dir string, log *slog.Logger) (*notifyListener, error) {
	path := filepath.Join(dir, "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return nil, fmt.Errorf("create notify socket: %w", err)
	}
	n := &notifyListener{
		path: path,
		conn: conn,
		log:  log,
		msgs: make(chan string, 16),
		seen: make(map[string]bool),
	}
	go n.read()
	return n, nil
}

func (n *notifyListener) read() {
	defer close(n.msgs)
	buf := make([]byte, 64<<10)
	for {
		m, err := n.conn.Read(buf)
		if err != nil {
			return // closed
		}
		n.msgs <- string(buf[:m])
	}
}

// Close closes the socket and removes its file (unlike stream listeners,
// unixgram sockets are not unlinked on close).
func (n *notifyListener) Close() error {
	err := n.conn.Close()
	if rmErr := os.Remove(n.path); rmErr != nil && !errors.Is(rmErr, fs.ErrNotExist) && err == nil {
		err = rmErr
	}
	return err
}

// wait blocks until an assignment equal to want (e.g. "READY=1") has been
// received, timeout elapses, ctx is done, or exited is closed. STATUS= lines
// are logged as they arrive so slow phases (initial sync) are visible.
func (n *notifyListener) wait(ctx context.Context, want string, timeout time.Duration, exited <-chan struct{}) error {
	if n.seen[want] {
		return nil
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		select {
		case msg, ok := <-n.msgs:
			if !ok {
				return errors.New("notify socket closed")
			}
			n.absorb(msg)
			if n.seen[want] {
				return nil
			}
		case <-exited:
			// Datagrams sent just before exit may still be queued.
			for drained := false; !drained; {
				select {
				case msg, ok := <-n.msgs:
					if !ok {
						drained = true
						break
					}
					n.absorb(msg)
				default:
					drained = true
				}
			}
			if n.seen[want] {
				return nil
			}
			return fmt.Errorf("waiting for %s: %w", want, errChildExited)
		case <-timer.C:
			return fmt.Errorf("no %s notification within %s", want, timeout)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// absorb records the assignments of one datagram.
func (n *notifyListener) absorb(msg string) {
	for line := range strings.SplitSeq(msg, "\n") {
		if line == "" {
			continue
		}
		n.seen[line] = true
		if s, ok := strings.CutPrefix(line, "STATUS="); ok {
			n.log.Info("agent status", "status", s)
		}
	}
}
