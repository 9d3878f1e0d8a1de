package layout

import (
	"slices"
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

func TestDiskGenerations(t *testing.T) {
	m := &Manifest{Version: ManifestVersion, Machine: "web1", Disks: []Disk{{Name: "sda"}}}
	d := &m.Disks[0]
	d.NewGeneration("g1", 100, 1)
	if len(d.Previous) != 0 {
		t.Fatalf("first generation left %+v in Previous", d.Previous)
	}
	d.NewGeneration("g2", 200, 50)
	since := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	d.UnprotectedFrom, d.UnprotectedSince = 60, since // left out of a hello
	d.NewGeneration("g3", 300, 80)
	b, err := MarshalManifest(m)
	if err != nil {
		t.Fatal(err)
	}
	got, err := UnmarshalManifest(b)
	if err != nil {
		t.Fatal(err)
	}
	gd := got.Disk("sda")
	want := []Generation{{"g1", 100, 1, 0, time.Time{}}, {"g2", 200, 50, 60, since}, {"g3", 300, 80, 0, time.Time{}}}
	if gens := gd.Generations(); len(gens) != 3 || gens[0] != want[0] || gens[1] != want[1] || gens[2] != want[2] {
		t.Fatalf("generations after a round trip: %+v, want %+v", gens, want)
	}
	for seq, i := range map[uint64]int{0: 0, 1: 0, 49: 0, 50: 1, 79: 1, 80: 2, 1000: 2} {
		if g := gd.GenerationAt(seq); g != i {
			t.Fatalf("GenerationAt(%d) = %d, want %d", seq, g, i)
		}
	}
	for seq, want := range map[uint64]bool{50: false, 59: false, 60: true, 79: true, 80: false, 1000: false} {
		if _, got := gd.UnprotectedAt(seq, time.Time{}); got != want {
			t.Fatalf("UnprotectedAt(%d) = %v, want %v", seq, got, want)
		}
	}
	// By time too: an idle machine's markers after the hello still carry
	// sequences below 60.
	for at, want := range map[time.Time]bool{since: false, since.Add(-time.Hour): false, since.Add(time.Millisecond): true} {
		if _, got := gd.UnprotectedAt(55, at); got != want {
			t.Fatalf("UnprotectedAt(55, %v) = %v, want %v", at, got, want)
		}
	}
}

func TestForgetGaps(t *testing.T) {
	m := Manifest{
		Gaps: []Gap{
			{From: 10, LostTo: 12, Mended: 20},                                       // mended before 100: goes
			{From: 30, LostTo: 31, Mended: 40, Unmended: []UnmendedDisk{{"b", 90}}},  // b synced at 90: goes
			{From: 50, LostTo: 51, Mended: 60, Unmended: []UnmendedDisk{{"b", 0}}},   // b never synced: stays
			{From: 70, LostTo: 71, Mended: 120},                                      // ends after 100: stays
			{From: 80, LostTo: 81},                                                   // open: stays
			{From: 85, LostTo: 86, Mended: 95, Unmended: []UnmendedDisk{{"a", 150}}}, // a synced after 100: stays
		},
	}
	if n := m.ForgetGaps(100); n != 2 {
		t.Fatalf("ForgetGaps(100) dropped %d gaps, want 2", n)
	}
	var from []uint64
	for _, g := range m.Gaps {
		from = append(from, g.From)
	}
	if !slices.Equal(from, []uint64{50, 70, 80, 85}) {
		t.Errorf("gaps left start at %v", from)
	}
	// What is left answers every state at or after 100 as before.
	if g, ok := m.GapAt(100); !ok || g.From != 70 {
		t.Errorf("GapAt(100) = %+v, %v", g, ok)
	}
	if n := m.ForgetGaps(100); n != 0 {
		t.Errorf("second ForgetGaps(100) dropped %d", n)
	}
}

func TestPointRecordName(t *testing.T) {
	name := PointRecordName("web1", "00000000000000000042", "app")
	if seq, kind, err := ParsePointRecordName("web1", name); err != nil || seq != 42 || kind != "app" {
		t.Fatalf("ParsePointRecordName(%q) = %d, %q, %v", name, seq, kind, err)
	}
	for _, bad := range []string{"web1/points/42-app", "web2/points/00000000000000000042-app", "web1/points/00000000000000000042", "web1/points/0000000000000000004x-crash", "web1/points/00000000000000000042-"} {
		if _, _, err := ParsePointRecordName("web1", bad); err == nil {
			t.Errorf("ParsePointRecordName(%q) accepted", bad)
		}
	}
}
