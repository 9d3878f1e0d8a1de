package recovery

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"path"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/seal"
)

// Keys is a machine's keyring as read from the account.
type Keys struct {
	seal.Keys
	// Skipped says why each key blob that did not unwrap was left out
	// (altered, or wrapped with another recovery key). A blob sealed
	// under one of them fails to open with seal.ErrUnknownKey; the
	// others still open, so one bad key blob does not stop a recovery
	// or the applier.
	Skipped []error
}

// Warn writes a line per skipped key blob to w (nil: nowhere).
func (k Keys) Warn(w io.Writer) {
	if w == nil {
		return
	}
	for _, err := range k.Skipped {
		fmt.Fprintf(w, "warning: skipped a data key: %v\n", err)
	}
}

// Explain adds to err, when it is a blob sealed under a key not in k
// (seal.ErrUnknownKey), why the key blobs left out were skipped.
func (k Keys) Explain(err error) error {
	if err == nil || len(k.Skipped) == 0 || !errors.Is(err, seal.ErrUnknownKey) {
		return err
	}
	return fmt.Errorf("%w (key blobs skipped: %w)", err, errors.Join(k.Skipped...))
}

// Keyring unwraps every data key of machine stored in the account (see
// layout.KeyName) with recoveryKey, so that segments sealed before a key
// rotation still open. Key blobs that do not unwrap are left out (see
// Keys.Skipped) as long as one does. When none does, a recovery key that
// does not unwrap them yields an error wrapping ErrWrongRecoveryKey that
// names both fingerprints, and a wrapped key that fails to unwrap
// although the fingerprints match wraps ErrTampered.
func Keyring(ctx context.Context, store blobstore.Store, machine string, recoveryKey []byte) (Keys, error) {
	if len(recoveryKey) != seal.KeySize {
		return Keys{}, fmt.Errorf("recovery key has %d bytes, want %d", len(recoveryKey), seal.KeySize)
	}
	infos, err := store.ListBlobs(ctx, layout.KeysPrefix(machine))
	if err != nil {
		return Keys{}, fmt.Errorf("list data keys of machine %q: %w", machine, err)
	}
	fp := seal.Fingerprint(recoveryKey)
	var keys []*seal.Key
	var skipped []error
	for _, bi := range infos {
		var id seal.KeyID
		raw, err := hex.DecodeString(path.Base(bi.Name))
		if err != nil || len(raw) != len(id) {
			continue // not a key blob
		}
		copy(id[:], raw)
		wrapped, err := store.GetBlob(ctx, bi.Name)
		if err != nil {
			return Keys{}, fmt.Errorf("read data key %s: %w", bi.Name, err)
		}
		dk, err := seal.UnwrapKey(recoveryKey, wrapped, id)
		if err != nil {
			switch want := bi.Metadata[layout.MetaKeyFP]; {
			case !errors.Is(err, seal.ErrTampered):
				err = fmt.Errorf("data key %s: %w", bi.Name, err)
			case want != "" && want != fp:
				err = fmt.Errorf("%w: machine %q's data key %s is wrapped with recovery key %s, but the key given is %s",
					ErrWrongRecoveryKey, machine, id, want, fp)
			case want == fp:
				err = fmt.Errorf("data key %s %w: it does not unwrap with recovery key %s, the key it says it is wrapped with: %w",
					bi.Name, ErrTampered, fp, err)
			default: // a key blob without its fingerprint
				err = fmt.Errorf("data key %s does not unwrap with recovery key %s (%w, or the key blob was %w): %w",
					bi.Name, fp, ErrWrongRecoveryKey, ErrTampered, err)
			}
			skipped = append(skipped, err)
			continue
		}
		k, err := seal.NewKey(id, dk)
		clear(dk)
		if err != nil {
			return Keys{}, err
		}
		keys = append(keys, k)
	}
	if len(keys) == 0 && len(skipped) > 0 {
		return Keys{}, skipped[0]
	}
	if len(keys) == 0 {
		// Not ErrNoMachine: callers read the manifest first, and a
		// machine with a manifest but no key lost its keys.
		return Keys{}, fmt.Errorf("%w: machine %q has none under %s (deleted?); without it none of its journal or manifest can be read", ErrNoDataKey, machine, layout.KeysPrefix(machine))
	}
	return Keys{Keys: seal.NewKeyring(keys...), Skipped: skipped}, nil
}
