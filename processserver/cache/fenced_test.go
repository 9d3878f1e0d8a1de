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
	if c.Fenced("m1") {
		t.Fatal("fenced before anything was recorded")
	}
	if err := c.SetFenced("m1", true); err != nil {
		t.Fatal(err)
	}
	if !c.Fenced("m1") || c.Fenced("m2") {
		t.Fatal("fenced record not read back for m1 alone")
	}
	c = reopen(t, c, Options{})
	for _, d := range dirs[:2] {
		os.Remove(d + "/" + fencedPrefix + "m1")
	}
	if !c.Fenced("m1") {
		t.Fatal("fenced record lost with two of three directories' copies")
	}
	if err := c.SetFenced("m1", false); err != nil {
		t.Fatal(err)
	}
	if c.Fenced("m1") {
		t.Fatal("fenced record not cleared")
	}
	if err := c.SetFenced("../x", true); err == nil {
		t.Fatal("a stream name with a path in it was taken")
	}
}
