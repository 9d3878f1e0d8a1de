package cache

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"
)

// fencedPrefix names the file, in each cache directory, recording that
// this process server stopped serving a stream's machine because another
// took it over. It outlives a restart: while the other serves the
// machine, what is cached for it here must not be published.
const fencedPrefix = markerName + ".fenced-"

// SetFenced records (on, with note: what the server knew of the journal
// then) or clears that the machine of stream is served by another
// process server, in every cache directory; it fails only if no
// directory took the change. Each record is stamped with the time: the
// newest found decides (Fenced), so a directory that missed a change (a
// disk unmounted meanwhile) does not bring an older record back.
func (c *Cache) SetFenced(stream string, on bool, note []byte) error {
	if err := CheckStream(stream); err != nil {
		return err
	}
	state := "off"
	if on {
		state = "on"
	}
	rec := append(fmt.Appendf(nil, "%s %s %d\n", fenceMagic, state, time.Now().UnixNano()), note...)
	err := c.everyDir(func(d string) error {
		name := filepath.Join(d, fencedPrefix+stream)
		f, err := c.fs.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o640)
		if err == nil {
			_, err = f.Write(rec)
			if serr := f.Sync(); err == nil {
				err = serr
			}
			if cerr := f.Close(); err == nil {
				err = cerr
			}
		}
		if err == nil {
			err = c.syncDir(d)
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("cache: record whether %s is served elsewhere: %w", stream, err)
	}
	return nil
}

// fenceMagic starts a fence record; a file without it (written before
// records were stamped) is an "on" record older than any stamped one.
const fenceMagic = "lifeboat-fence"

// Fenced reports whether the newest record of the cache directories says
// that the machine of stream is served by another process server
// (SetFenced), and the note recorded with it.
func (c *Cache) Fenced(stream string) (note []byte, fenced bool) {
	if CheckStream(stream) != nil {
		return nil, false
	}
	b, ok := c.newestRecord(fencedPrefix+stream, fenceStamp)
	if !ok {
		return nil, false
	}
	if head, tail, ok := bytes.Cut(b, []byte("\n")); ok && bytes.HasPrefix(head, []byte(fenceMagic+" ")) {
		if !bytes.HasPrefix(head, []byte(fenceMagic+" on ")) {
			return nil, false
		}
		return tail, true
	}
	return b, true // unstamped: "on"
}

// fenceStamp returns when a fence record was written: 0 for one written
// before records were stamped, false for a torn one.
func fenceStamp(b []byte) (int64, bool) {
	head, _, ok := bytes.Cut(b, []byte("\n"))
	if !ok || !bytes.HasPrefix(head, []byte(fenceMagic+" ")) {
		return 0, true
	}
	var state string
	var stamp int64
	if _, err := fmt.Sscanf(string(head), fenceMagic+" %s %d", &state, &stamp); err != nil {
		return 0, false // another directory's copy decides
	}
	return stamp, true
}

// everyDir runs write for every cache directory mounted where it belongs,
// for a small record each must hold; it fails only if none took it. Below
// an unmounted disk's mount point the record would be hidden once the
// disk is back, and an older one there would decide. (Checked without
// checkMounted's grace: records are few.)
func (c *Cache) everyDir(write func(dir string) error) error {
	var errs []error
	werrs, _ := c.onDirs(nil, func(i int, _ *dirOp) error {
		if err := c.checkMountedNow(i); err != nil {
			return err
		}
		return write(c.dirs[i])
	})
	for _, err := range werrs {
		if err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) == len(c.dirs) {
		return errors.Join(errs...)
	}
	return nil
}

// newestRecord returns the record under name, among the cache
// directories' copies, that stamp says was written last (SetFenced and
// SetRecoverable stamp theirs): a directory that missed a later write does
// not decide. Copies stamp refuses (torn) are skipped; false: none.
func (c *Cache) newestRecord(name string, stamp func([]byte) (int64, bool)) ([]byte, bool) {
	var newest []byte
	best := int64(-1)
	copies, errs := dirValues(c, nil, func(i int) ([]byte, error) { return c.fs.ReadFile(filepath.Join(c.dirs[i], name)) })
	for i, err := range errs {
		if err != nil {
			continue
		}
		if t, ok := stamp(copies[i]); ok && t > best {
			best, newest = t, copies[i]
		}
	}
	return newest, newest != nil
}
