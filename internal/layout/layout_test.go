package layout

import (
	"sort"
	"testing"
	"time"
)

func TestSegmentNamesSortInSequenceOrder(t *testing.T) {
	names := []string{SegmentName("m", 100, 200), SegmentName("m", 9, 99), SegmentName("m", 201, 1000)}
	sort.Strings(names)
	want := []uint64{9, 100, 201}
	for i, n := range names {
		f, _, err := ParseSegmentName(n)
		if err != nil || f != want[i] {
			t.Fatalf("%s: first %d, %v; want %d", n, f, err, want[i])
		}
	}
	if _, _, err := ParseSegmentName("m/journal/5-3"); err == nil {
		t.Fatal("a reversed range parsed")
	}
}

func TestManifestRoundTrip(t *testing.T) {
	m := &Manifest{Version: ManifestVersion, Machine: "web1", Disks: []Disk{{Name: "sda", Size: 1 << 30, Generation: "ab"}},
		DurableSeq: 10, AppliedSeq: 8, RecoverableUntil: time.Unix(100, 0).UTC()}
	b, err := MarshalManifest(m)
	if err != nil {
		t.Fatal(err)
	}
	got, err := UnmarshalManifest(b)
	if err != nil || got.Disk("sda") == nil || got.DurableSeq != 10 || !got.RecoverableUntil.Equal(m.RecoverableUntil) {
		t.Fatalf("got %+v, %v", got, err)
	}
	if _, err := UnmarshalManifest([]byte(`{"version":99}`)); err == nil {
		t.Fatal("future manifest accepted")
	}
	if CheckName("machine", "a/b") == nil || CheckName("disk", "") == nil || CheckName("disk", "sda") != nil {
		t.Fatal("CheckName")
	}
}
