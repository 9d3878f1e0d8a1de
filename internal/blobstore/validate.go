package blobstore

import (
	"fmt"
	"strings"
)

// Validation shared by implementations so that every Store rejects the same
// inputs with ErrInvalid before touching the network.

// CheckName validates a blob name.
func CheckName(name string) error {
	if name == "" || len(name) > 1024 {
		return fmt.Errorf("blob name %q: length must be 1..1024: %w", name, ErrInvalid)
	}
	if strings.HasSuffix(name, "/") || strings.HasSuffix(name, ".") {
		// Azure normalises such names, so they would not round-trip.
		return fmt.Errorf("blob name %q must not end with '/' or '.': %w", name, ErrInvalid)
	}
	return nil
}

// CheckPageBlobSize validates the size of a page blob.
func CheckPageBlobSize(size int64) error {
	if size < 0 || size%PageSize != 0 || size > MaxPageBlobSize {
		return fmt.Errorf("page blob size %d: must be a multiple of %d in [0, 8 TiB]: %w", size, PageSize, ErrInvalid)
	}
	return nil
}

// CheckPageRange validates that [offset, offset+length) is page aligned and
// not negative. Whether it lies within the blob is checked by the store.
func CheckPageRange(offset, length int64) error {
	if offset < 0 || length < 0 || offset%PageSize != 0 || length%PageSize != 0 {
		return fmt.Errorf("page range offset %d length %d: must be non-negative multiples of %d: %w",
			offset, length, PageSize, ErrInvalid)
	}
	if offset+length > MaxPageBlobSize {
		return fmt.Errorf("page range offset %d length %d: beyond 8 TiB: %w", offset, length, ErrInvalid)
	}
	return nil
}

// CheckMetadata validates md against the rules documented on Metadata.
func CheckMetadata(md Metadata) error {
	total := 0
	lower := make(map[string]string, len(md))
	for k, v := range md {
		if !validMetadataName(k) {
			return fmt.Errorf("metadata name %q: must match [a-z_][a-z0-9_]* (case-insensitive): %w", k, ErrInvalid)
		}
		if other, dup := lower[strings.ToLower(k)]; dup {
			// Stored lower-cased, one would silently replace the other.
			return fmt.Errorf("metadata names %q and %q differ only in case: %w", other, k, ErrInvalid)
		}
		lower[strings.ToLower(k)] = k
		if v != strings.TrimSpace(v) {
			return fmt.Errorf("metadata %q: value has leading or trailing spaces: %w", k, ErrInvalid)
		}
		for i := 0; i < len(v); i++ {
			if v[i] < 0x20 || v[i] > 0x7e {
				return fmt.Errorf("metadata %q: value must be printable ASCII: %w", k, ErrInvalid)
			}
		}
		total += len(k) + len(v)
	}
	if total > MaxMetadataSize {
		return fmt.Errorf("metadata is %d bytes, limit %d: %w", total, MaxMetadataSize, ErrInvalid)
	}
	return nil
}

func validMetadataName(k string) bool {
	if k == "" {
		return false
	}
	for i := 0; i < len(k); i++ {
		c := k[i]
		letter := (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
		digit := c >= '0' && c <= '9'
		if !letter && c != '_' && !(digit && i > 0) {
			return false
		}
	}
	return true
}

// NormalizeMetadata returns md with lower-cased names, or nil if md is
// empty. It does not modify md.
func NormalizeMetadata(md Metadata) Metadata {
	if len(md) == 0 {
		return nil
	}
	out := make(Metadata, len(md))
	for k, v := range md {
		out[strings.ToLower(k)] = v
	}
	return out
}

// CoalesceRanges merges adjacent or overlapping ranges of a slice sorted by
// Offset, in place, and returns the shortened slice.
func CoalesceRanges(rs []PageRange) []PageRange {
	if len(rs) == 0 {
		return rs
	}
	out := rs[:1]
	for _, r := range rs[1:] {
		last := &out[len(out)-1]
		if r.Offset <= last.End() {
			if r.End() > last.End() {
				last.Length = r.End() - last.Offset
			}
			continue
		}
		out = append(out, r)
	}
	return out
}
