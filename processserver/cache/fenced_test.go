package cache

import (
	"os"
	"testing"
)

// The record that another process server serves a stream's machine
// outlives a restart, survives the loss of all but one directory, and is
// cleared everywhere.
func TestFencedRecord(t *testing.T) {
	dirs := tempDirs(t, 3)
	c := open(t, dirs, Options{})
	if _, f := c.Fenced("m1"); f {
		t.Fatal("fenced before anything was recorded")
	}
	if err := c.SetFenced("m1", true, []byte("journal")); err != nil {
		t.Fatal(err)
	}
	if _, f := c.Fenced("m2"); f {
		t.Fatal("fenced record read back for m2")
	}
	if note, f := c.Fenced("m1"); !f || string(note) != "journal" {
		t.Fatalf("fenced record of m1 read back as %v %q", f, note)
	}
	c = reopen(t, c, Options{})
	for _, d := range dirs[:2] {
		os.Remove(d + "/" + fencedPrefix + "m1")
	}
	if note, f := c.Fenced("m1"); !f || string(note) != "journal" {
		t.Fatal("fenced record lost with two of three directories' copies")
	}
	if err := c.SetFenced("m1", false, nil); err != nil {
		t.Fatal(err)
	}
	if _, f := c.Fenced("m1"); f {
		t.Fatal("fenced record not cleared")
	}
	if err := c.SetFenced("../x", true, nil); err == nil {
		t.Fatal("a stream name with a path in it was taken")
	}
}

// A directory that missed the clearing of a record (its disk unmounted
// then, say) does not bring the record back: the newest one decides. A
// record from before records were stamped counts as the oldest.
func TestFencedRecordNewestDecides(t *testing.T) {
	dirs := tempDirs(t, 3)
	c := open(t, dirs, Options{})
	if err := c.SetFenced("m1", true, []byte("old journal")); err != nil {
		t.Fatal(err)
	}
	missed, err := os.ReadFile(dirs[0] + "/" + fencedPrefix + "m1")
	if err != nil {
		t.Fatal(err)
	}
	if err := c.SetFenced("m1", false, nil); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dirs[0]+"/"+fencedPrefix+"m1", missed, 0o640); err != nil {
		t.Fatal(err)
	}
	if _, f := c.Fenced("m1"); f {
		t.Fatal("a directory's older record brought the fence back")
	}
	if err := os.WriteFile(dirs[1]+"/"+fencedPrefix+"m1", []byte("unstamped"), 0o640); err != nil {
		t.Fatal(err)
	}
	if _, f := c.Fenced("m1"); f {
		t.Fatal("an unstamped record outranked a stamped one")
	}
	for _, d := range dirs {
		if err := os.WriteFile(d+"/"+fencedPrefix+"m1", []byte("unstamped"), 0o640); err != nil {
			t.Fatal(err)
		}
	}
	if note, f := c.Fenced("m1"); !f || string(note) != "unstamped" {
		t.Fatalf("unstamped records alone read as %v %q, want fenced", f, note)
	}
}
