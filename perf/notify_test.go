package perf

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"testing"
	"time"
)

func discardLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func newTestListener(t *testing.T) *notifyListener {
	t.Helper()
	n, err := listenNotify(t.TempDir(), discardLog())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}

// send delivers one datagram the way sd_notify does.
func send(t *testing.T, path, msg string) {
	t.Helper()
	if err := sendErr(path, msg); err != nil {
		t.Fatal(err)
	}
}

// sendErr is send for a goroutine other than the test's.
func sendErr(path, msg string) error {
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return err
	}
	defer c.Close()
	_, err = c.Write([]byte(msg))
	return err
}

func TestNotifyWaitReadyThenSynced(t *testing.T) {
	n := newTestListener(t)
	ctx := context.Background()
	never := make(chan struct{})

	send(t, n.path, "STATUS=starting")
	send(t, n.path, "X-LIFEBOAT-SYNCEDX=1\nREADY=1\nSTATUS=copying 0%")
	if err := n.wait(ctx, readyMsg, 5*time.Second, never); err != nil {
		t.Fatalf("wait READY: %v", err)
	}
	// A lookalike must not count as the synced notification.
	if err := n.wait(ctx, syncedMsg, 100*time.Millisecond, never); err == nil || !strings.Contains(err.Error(), "within") {
		t.Fatalf("wait SYNCED before it was sent = %v, want timeout", err)
	}
	sent := make(chan error, 1)
	go func() {
		time.Sleep(20 * time.Millisecond)
		sent <- sendErr(n.path, "STATUS=copying 100%\nX-LIFEBOAT-SYNCED=1\n")
	}()
	t.Cleanup(func() {
		if err := <-sent; err != nil {
			t.Error(err)
		}
	})
	if err := n.wait(ctx, syncedMsg, 5*time.Second, never); err != nil {
		t.Fatalf("wait SYNCED: %v", err)
	}
}

func TestNotifyBundledMessagesNotLost(t *testing.T) {
	n := newTestListener(t)
	never := make(chan struct{})
	send(t, n.path, "READY=1\nX-LIFEBOAT-SYNCED=1")
	if err := n.wait(context.Background(), readyMsg, 5*time.Second, never); err != nil {
		t.Fatal(err)
	}
	// Already received with READY=1: must return without another datagram.
	if err := n.wait(context.Background(), syncedMsg, 10*time.Millisecond, never); err != nil {
		t.Fatalf("SYNCED bundled with READY was lost: %v", err)
	}
}

func TestNotifyWaitChildExited(t *testing.T) {
	n := newTestListener(t)
	exited := make(chan struct{})
	close(exited)
	err := n.wait(context.Background(), readyMsg, 5*time.Second, exited)
	if !errors.Is(err, errChildExited) {
		t.Fatalf("wait with exited child = %v, want errChildExited", err)
	}
}

func TestNotifyWaitContextCanceled(t *testing.T) {
	n := newTestListener(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := n.wait(ctx, readyMsg, 5*time.Second, make(chan struct{})); !errors.Is(err, context.Canceled) {
		t.Fatalf("wait with canceled ctx = %v", err)
	}
}

func TestNotifyCloseRemovesSocket(t *testing.T) {
	n, err := listenNotify(t.TempDir(), discardLog())
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(n.path); !os.IsNotExist(err) {
		t.Errorf("socket file still present after Close: %v", err)
	}
}
