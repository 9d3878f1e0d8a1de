package processserver

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore/azure"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
	"github.com/lifeboat-dr/lifeboat/processserver/cache"
)

const childEnv = "LIFEBOAT_PS_TEST_CHILD"

// childConfig is what the parent test passes to a process-server child.
type childConfig struct {
	PKI, RecoveryKey, ConnStr, Container string
	Cache                                []string
}

// runChild runs a process server in this (re-executed test) process until
// it is killed. It prints "ADDR <addr>" once listening.
func runChild() {
	var c childConfig
	if err := json.Unmarshal([]byte(os.Getenv(childEnv)), &c); err != nil {
		panic(err)
	}
	store, err := azure.New(azure.Config{ConnectionString: c.ConnStr, Container: c.Container})
	if err != nil {
		panic(err)
	}
	s, err := Start(context.Background(), Config{
		Listen: "127.0.0.1:0", PKIDir: c.PKI, Name: "ps", CacheDirs: c.Cache, RecoveryKeyFile: c.RecoveryKey,
		Store: store, SegmentBytes: 64 << 10, SegmentAge: 50 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(os.Stderr, nil)),
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Printf("ADDR %s\n", s.Addr())
	select {}
}

func startChild(t *testing.T, c childConfig) (*exec.Cmd, net.Addr) {
	t.Helper()
	js, _ := json.Marshal(c)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+string(js))
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL} // no orphan when the test binary dies
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() || testing.Verbose() {
			t.Logf("process server child log:\n%s", stderr.String())
		}
	})
	line, err := bufio.NewReader(out).ReadString('\n')
	addr, ok := strings.CutPrefix(strings.TrimSpace(line), "ADDR ")
	if err != nil || !ok {
		t.Fatalf("child process server did not start: %v %q", err, line)
	}
	a, err := net.ResolveTCPAddr("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	return cmd, a
}

// TestSIGKILLRestart: a process server killed with SIGKILL mid-stream and
// started again on the same cache loses nothing that was acked, resumes
// the agent without any resync, and the journal ends up holding every
// record exactly once.
func TestSIGKILLRestart(t *testing.T) {
	store, cs, container := azureStoreNamed(t)
	e := newEnv(t, store, 3)
	cc := childConfig{PKI: e.pki, RecoveryKey: e.rkFile, ConnStr: cs, Container: container, Cache: e.cache}
	child, addr := startChild(t, cc)

	a := dialAgentAddr(t, e, addr, "m1")
	ack, _ := a.hello("m1", disk0)
	gen := ack.Disks[0].Generation
	const batches, per = 30, 10
	type sentBatch struct {
		last  uint64
		frame []byte
	}
	var sent []sentBatch
	for i := range batches {
		n := len(a.sent)
		last := a.batch(uint64(1+i*per), per)
		sent = append(sent, sentBatch{last, bytes.Clone(a.sent[n:])})
		if i == batches/2 {
			a.waitAck(last)
			child.Process.Signal(syscall.SIGKILL)
			break
		}
	}
	child.Wait()
	acked := sent[len(sent)-1].last

	_, addr = startChild(t, cc)
	b := dialAgentAddr(t, e, addr, "m1")
	ack, _ = b.hello("m1", wire.DiskState{Name: disk0.Name, Size: disk0.Size, Generation: gen, LastAckedSeq: acked})
	d := ack.Disks[0]
	if d.Action != wire.SyncResume || d.ResumeFrom <= acked || d.Generation != gen {
		t.Fatalf("after SIGKILL: %+v, want resume after %d with the same generation", d, acked)
	}
	// The agent resends what it holds from ResumeFrom on, then goes on.
	for _, sb := range sent {
		if sb.last >= d.ResumeFrom {
			if err := b.w.WriteRaw(sb.frame); err != nil {
				t.Fatal(err)
			}
		}
	}
	for i := len(sent); i < batches; i++ {
		b.batch(uint64(1+i*per), per)
	}
	b.waitAck(batches * per)
	eventually(t, 30*time.Second, "upload of everything", func() bool { return durableSeq(t, store, "m1") >= batches*per })

	plain, _, _ := journal(t, store, e.rk, "m1")
	seen := map[uint64]int{}
	for _, rec := range journalRecords(t, plain) {
		seen[rec.Seq]++
		if rec.Offset != rec.Seq*4096 || !bytes.Equal(rec.Data, batchData(rec.Seq, int((rec.Seq-1)%per))) {
			t.Fatalf("record %d has wrong offset or content", rec.Seq)
		}
	}
	for seq := uint64(1); seq <= batches*per; seq++ {
		if seen[seq] != 1 {
			t.Fatalf("record %d appears %d times in the journal, want once", seq, seen[seq])
		}
	}
}

// TestRestartDropsRemainsOfAppliedSegment: a crash while a segment that is
// already in the journal (and applied) is being deleted from the cache
// leaves some of its shards, too few to read it. The next run must drop
// them, not take them for acknowledged data lost (which costs the agent a
// checksum resync).
func TestRestartDropsRemainsOfAppliedSegment(t *testing.T) {
	store := azureStore(t)
	e := newEnv(t, store, 3)
	s := e.start()
	a := dialAgent(t, e, s, "m1")
	ack, _ := a.hello("m1", disk0)
	gen := ack.Disks[0].Generation
	last := a.batch(1, 10)
	a.waitAck(last)
	eventually(t, 30*time.Second, "upload and deletion from the cache", func() bool {
		ids, err := s.cache.List("m1")
		return err == nil && len(ids) == 0 && durableSeq(t, store, "m1") >= last
	})
	a.conn.Close()
	s.Close()

	// What a crash in the middle of Delete leaves: one shard of three.
	c, err := cache.Open(e.cache, cache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	id := cache.SegmentID{Stream: "m1", Seq: 1}
	if err := c.Put(id, bytes.Repeat([]byte("x"), 100_000)); err != nil {
		t.Fatal(err)
	}
	for _, dir := range e.cache[:2] {
		names, err := filepath.Glob(filepath.Join(dir, "m1", "*"))
		if err != nil || len(names) != 1 {
			t.Fatalf("shards in %s: %v, %v", dir, names, err)
		}
		if err := os.Remove(names[0]); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.Get(id); err == nil {
		t.Fatal("one shard of three still reads")
	}
	c.Close()

	s = e.start()
	eventually(t, 30*time.Second, "the remains dropped", func() bool {
		ids, err := s.cache.List("m1")
		return err == nil && len(ids) == 0
	})
	b := dialAgent(t, e, s, "m1")
	ack, _ = b.hello("m1", wire.DiskState{Name: disk0.Name, Size: disk0.Size, Generation: gen, LastAckedSeq: last})
	if d := ack.Disks[0]; d.Action != wire.SyncResume || d.Generation != gen {
		t.Fatalf("after the restart: %+v, want a resume with the same generation", d)
	}
	if strings.Contains(e.logs.String(), "acknowledged segment unreadable") {
		t.Fatal("the remains of an applied segment were taken for lost data")
	}
}
