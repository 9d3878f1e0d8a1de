package cache

import (
	"fmt"
	"os"
	"testing"
	"time"
)

// The recoverable_until hint outlives a restart and the loss of all but
// one directory's copy; a torn or foreign copy is ignored.
func TestRecoverableHint(t *testing.T) {
	dirs := tempDirs(t, 3)
	c := open(t, dirs, Options{})
	if got := c.Recoverable("m1"); !got.IsZero() {
		t.Fatalf("hint before any was recorded: %v", got)
	}
	at := time.Date(2026, 11, 27, 10, 0, 0, 123, time.UTC)
	if err := c.SetRecoverable("m1", at); err != nil {
		t.Fatal(err)
	}
	if got := c.Recoverable("m2"); !got.IsZero() {
		t.Fatalf("m1's hint read back for m2: %v", got)
	}
	c = reopen(t, c, Options{})
	for _, d := range dirs[:2] {
		os.Remove(d + "/" + recoverablePrefix + "m1")
	}
	if got := c.Recoverable("m1"); !got.Equal(at) {
		t.Fatalf("hint read back as %v, want %v", got, at)
	}
	if err := os.WriteFile(dirs[0]+"/"+recoverablePrefix+"m1", []byte("17 5"), 0o640); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dirs[1]+"/"+recoverablePrefix+"m1", []byte("not a time"), 0o640); err != nil {
		t.Fatal(err)
	}
	if got := c.Recoverable("m1"); !got.Equal(at) {
		t.Fatalf("an older or torn copy decided: %v, want %v", got, at)
	}
	// Moved back (another server's manifest taken): the newest write
	// decides, also over a directory that missed it with a later time.
	back := at.Add(-time.Hour)
	if err := c.SetRecoverable("m1", back); err != nil {
		t.Fatal(err)
	}
	missed := fmt.Sprintf("%d %d", at.Add(time.Hour).UnixNano(), 6)
	if err := os.WriteFile(dirs[1]+"/"+recoverablePrefix+"m1", []byte(missed), 0o640); err != nil {
		t.Fatal(err)
	}
	if got := c.Recoverable("m1"); !got.Equal(back) {
		t.Fatalf("after moving back: %v, want %v", got, back)
	}
	if streams, err := c.Streams(); err != nil || len(streams) != 0 {
		t.Fatalf("hint files listed as streams: %v %v", streams, err)
	}
	if err := c.SetRecoverable("../x", at); err == nil {
		t.Fatal("a stream name with a path in it was taken")
	}
}
