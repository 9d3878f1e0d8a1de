package recovery

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"path"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/seal"
)

// Keyring unwraps every data key of machine stored in the account (see
// layout.KeyName) with recoveryKey, so that segments sealed before a key
// rotation still open. A recovery key that does not unwrap them yields an
// error wrapping ErrWrongRecoveryKey that names both fingerprints; a
// wrapped key that fails to unwrap although the fingerprints match wraps
// ErrTampered.
func Keyring(ctx context.Context, store blobstore.Store, machine string, recoveryKey []byte) (seal.Keys, error) {
	if len(recoveryKey) != seal.KeySize {
		return nil, fmt.Errorf("recovery key has %d bytes, want %d", len(recoveryKey), seal.KeySize)
	}
	infos, err := store.ListBlobs(ctx, layout.KeysPrefix(machine))
	if err != nil {
		return nil, fmt.Errorf("list data keys of machine %q: %w", machine, err)
	}
	fp := seal.Fingerprint(recoveryKey)
	var keys []*seal.Key
	for _, bi := range infos {
		var id seal.KeyID
		raw, err := hex.DecodeString(path.Base(bi.Name))
		if err != nil || len(raw) != len(id) {
			continue // not a key blob
		}
		copy(id[:], raw)
		wrapped, err := store.GetBlob(ctx, bi.Name)
		if err != nil {
			return nil, fmt.Errorf("read data key %s: %w", bi.Name, err)
		}
		dk, err := seal.UnwrapKey(recoveryKey, wrapped, id)
		if err != nil {
			if !errors.Is(err, seal.ErrTampered) {
				return nil, fmt.Errorf("data key %s: %w", bi.Name, err)
			}
			if want := bi.Metadata[layout.MetaKeyFP]; want != "" && want != fp {
				return nil, fmt.Errorf("%w: machine %q's data key %s is wrapped with recovery key %s, but the key given is %s",
					ErrWrongRecoveryKey, machine, id, want, fp)
			}
			return nil, fmt.Errorf("data key %s does not unwrap with recovery key %s (%w, or the key blob was %w): %w",
				bi.Name, fp, ErrWrongRecoveryKey, ErrTampered, err)
		}
		k, err := seal.NewKey(id, dk)
		clear(dk)
		if err != nil {
			return nil, err
		}
		keys = append(keys, k)
	}
	if len(keys) == 0 {
		// Not ErrNoMachine: callers read the manifest first, and a
		// machine with a manifest but no key lost its keys.
		return nil, fmt.Errorf("%w: machine %q has none under %s (deleted?); without it none of its journal or manifest can be read", ErrNoDataKey, machine, layout.KeysPrefix(machine))
	}
	return seal.NewKeyring(keys...), nil
}
