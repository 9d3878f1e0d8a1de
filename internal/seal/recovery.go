package seal

import (
	"bufio"
	"bytes"
	"cmp"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// Recovery keys wrap (encrypt) the per-machine data keys. The wrapped data
// keys are stored next to the data (the storage account); the recovery
// key is the only thing needed to decrypt a machine's journal after
// losing the process server. Every process server holds it too (it
// unwraps the data keys it seals under), so a copy kept off-site by the
// operator is what survives the site; whoever reads it on a process
// server's host can read every machine that server protects.
//
// A wrapped key is
//
//	magic "LBWK" | version 1 | nonce (12) | GCM(data key (32) || tag (16))
//
// sealed with AES-256-GCM under the recovery key, with magic|version|key id
// as additional data: a wrapped key moved to another key id fails to unwrap.

const (
	wrapMagic = "LBWK"
	wrapHdr   = 4 + 1 + nonceSize
	// WrappedKeySize is the length of a wrapped data key.
	WrappedKeySize = wrapHdr + KeySize + tagSize

	recoveryHeader = "lifeboat-recovery-key v1"
)

// NewRecoveryKey returns a fresh random 32-byte recovery key.
func NewRecoveryKey() []byte {
	k := make([]byte, KeySize)
	rand.Read(k)
	return k
}

// Fingerprint returns a short, non-secret name for a recovery key (the
// first 8 bytes of its SHA-256, hex) so operators can tell keys apart
// without ever displaying one.
func Fingerprint(key []byte) string {
	sum := sha256.Sum256(key)
	return hex.EncodeToString(sum[:8])
}

// WrapKey encrypts dataKey under recoveryKey, bound to keyID.
func WrapKey(recoveryKey, dataKey []byte, keyID KeyID) ([]byte, error) {
	if len(recoveryKey) != KeySize {
		return nil, fmt.Errorf("seal: wrap key %s: recovery key has %d bytes, want %d", keyID, len(recoveryKey), KeySize)
	}
	if len(dataKey) != KeySize {
		return nil, fmt.Errorf("seal: wrap key %s: data key has %d bytes, want %d", keyID, len(dataKey), KeySize)
	}
	aead, err := newGCM(recoveryKey)
	if err != nil {
		return nil, fmt.Errorf("seal: wrap key %s: %w", keyID, err)
	}
	out := make([]byte, wrapHdr, WrappedKeySize)
	copy(out, wrapMagic)
	out[4] = version
	rand.Read(out[5:wrapHdr])
	return aead.Seal(out, out[5:wrapHdr], dataKey, wrapAD(keyID)), nil
}

// UnwrapKey reverses WrapKey. It returns an error wrapping ErrTampered if
// wrapped was modified, was wrapped for another key id, or recoveryKey is
// not the key it was wrapped with.
func UnwrapKey(recoveryKey, wrapped []byte, keyID KeyID) ([]byte, error) {
	if len(recoveryKey) != KeySize {
		return nil, fmt.Errorf("seal: unwrap key %s: recovery key has %d bytes, want %d", keyID, len(recoveryKey), KeySize)
	}
	if len(wrapped) != WrappedKeySize || string(wrapped[:4]) != wrapMagic || wrapped[4] != version {
		return nil, fmt.Errorf("seal: unwrap key %s: malformed wrapped key (%d bytes): %w", keyID, len(wrapped), ErrTampered)
	}
	aead, err := newGCM(recoveryKey)
	if err != nil {
		return nil, fmt.Errorf("seal: unwrap key %s: %w", keyID, err)
	}
	dk, err := aead.Open(nil, wrapped[5:wrapHdr], wrapped[wrapHdr:], wrapAD(keyID))
	if err != nil {
		return nil, fmt.Errorf("seal: unwrap key %s with recovery key %s: %w", keyID, Fingerprint(recoveryKey), ErrTampered)
	}
	return dk, nil
}

func wrapAD(id KeyID) []byte {
	ad := make([]byte, 0, 5+len(id))
	ad = append(ad, wrapMagic...)
	ad = append(ad, version)
	return append(ad, id[:]...)
}

// WriteRecoveryKey stores key at path as a text file, mode 0600:
//
//	lifeboat-recovery-key v1
//	fingerprint: <16 hex digits>
//	key: <64 hex digits>
//
// The fingerprint catches typing mistakes when the key is restored from
// paper. An existing file is never overwritten: replacing a recovery key
// would make every key wrapped with the old one unrecoverable.
func WriteRecoveryKey(path string, key []byte) (err error) {
	if len(key) != KeySize {
		return fmt.Errorf("seal: recovery key has %d bytes, want %d", len(key), KeySize)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, fs.ErrExist) {
		if fi, serr := os.Stat(path); serr == nil && fi.IsDir() {
			return fmt.Errorf("seal: %s is a directory: give the path of the recovery key file to create", path)
		}
		return fmt.Errorf("seal: %s exists: refusing to overwrite a recovery key (every machine's data keys are wrapped by the one it holds)", path)
	}
	if err != nil {
		return fmt.Errorf("seal: create recovery key file: %w", err)
	}
	defer func() {
		if cerr := f.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("seal: write recovery key file %s: %w", path, cerr)
		}
		if err != nil {
			os.Remove(path)
		}
	}()
	text := fmt.Sprintf("%s\nfingerprint: %s\nkey: %s\n", recoveryHeader, Fingerprint(key), hex.EncodeToString(key))
	if _, err := f.WriteString(text); err != nil {
		return fmt.Errorf("seal: write recovery key file %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("seal: sync recovery key file %s: %w", path, err)
	}
	// Its name too: a crash must not lose a key the data is wrapped by.
	if d, err := os.Open(filepath.Dir(path)); err == nil {
		err = d.Sync()
		d.Close()
		// Some file systems (FUSE, shared folders) sync no directory.
		if err != nil && !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ENOTSUP) {
			return fmt.Errorf("seal: sync the directory of recovery key file %s: %w", path, err)
		}
	}
	return nil
}

// LoadRecoveryKey reads a file written by WriteRecoveryKey. It refuses a
// file that group or others can access or that another user owns, and one
// whose fingerprint does not match its key. Errors never contain key
// material.
func LoadRecoveryKey(path string) ([]byte, error) { return loadRecoveryKey(path, nil) }

// LoadRecoveryKeyToRead is LoadRecoveryKey for reading the account only
// (recover, points): a file open to others or owned by another user is
// used, with a warning to warn, since no new data key is wrapped under
// it. A key kept on a FAT USB stick, whose files show mode 0755 and
// cannot be changed, then recovers without being copied first.
func LoadRecoveryKeyToRead(path string, warn io.Writer) ([]byte, error) {
	return loadRecoveryKey(path, warn)
}

func loadRecoveryKey(path string, warn io.Writer) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("seal: recovery key: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat() // the file read below, not whatever the path names later
	if err != nil {
		return nil, fmt.Errorf("seal: recovery key: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("seal: recovery key %s is not a regular file", path)
	}
	var loose error
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		loose = fmt.Errorf("seal: recovery key file %s has mode %#o, open to its group or others; run chmod 600 on it", path, perm)
	}
	// Owned by someone else, it may be another's key put in its place
	// (by one who can write its directory): new data keys would be
	// wrapped under it.
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Uid != 0 && int(st.Uid) != os.Geteuid() {
		loose = cmp.Or(loose, fmt.Errorf("seal: recovery key file %s is owned by uid %d, not by this user (%d) or root; chown it", path, st.Uid, os.Geteuid()))
	}
	switch {
	case loose != nil && warn == nil:
		return nil, loose
	case loose != nil:
		fmt.Fprintf(warn, "warning: %v (used: reading the account wraps nothing under it)\n", loose)
	}
	raw, err := io.ReadAll(io.LimitReader(f, 4096))
	if err != nil {
		return nil, fmt.Errorf("seal: recovery key: %w", err)
	}
	key, err := parseRecoveryKey(raw)
	if err != nil {
		return nil, fmt.Errorf("seal: recovery key file %s: %w", path, err)
	}
	return key, nil
}

func parseRecoveryKey(raw []byte) ([]byte, error) {
	sc := bufio.NewScanner(bytes.NewReader(raw))
	var lines []string
	for sc.Scan() {
		if l := strings.TrimSpace(sc.Text()); l != "" {
			lines = append(lines, l)
		}
	}
	if len(lines) != 3 || lines[0] != recoveryHeader {
		return nil, fmt.Errorf("not a %q file", recoveryHeader)
	}
	fp, ok1 := strings.CutPrefix(lines[1], "fingerprint:")
	kh, ok2 := strings.CutPrefix(lines[2], "key:")
	if !ok1 || !ok2 {
		return nil, errors.New("want lines \"fingerprint: ...\" and \"key: ...\"")
	}
	key, err := hex.DecodeString(strings.TrimSpace(kh))
	if err != nil || len(key) != KeySize {
		// Don't echo the line: it may be an almost-correct key.
		return nil, fmt.Errorf("key line is not %d hex digits", 2*KeySize)
	}
	if got, want := Fingerprint(key), strings.TrimSpace(fp); got != want {
		return nil, fmt.Errorf("key does not match fingerprint %s (typo?)", want)
	}
	if bytes.Count(key, key[:1]) == len(key) {
		// A fingerprint anyone can compute proves no randomness.
		return nil, errors.New("key is one byte repeated, not a generated key: make one with lifeboat keys init")
	}
	return key, nil
}
