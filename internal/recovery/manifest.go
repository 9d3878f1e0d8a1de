package recovery

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/seal"
)

// The manifest steers recovery (which disk is which, where generations
// start, gaps, the durable sequence), so it is authenticated like the
// journal: its Seal field is a sealed blob with no plaintext whose
// associated data is the manifest without that field. The key is the
// machine's data key, so forging one takes the recovery key.

// manifestAD is the associated data sealing m: a fixed label, then m
// encoded with an empty Seal.
func manifestAD(m *layout.Manifest) ([]byte, error) {
	c := *m
	c.Seal = ""
	b, err := json.Marshal(&c)
	if err != nil {
		return nil, err
	}
	return append([]byte("lifeboat manifest\x00"), b...), nil
}

// SealManifest sets m.Seal for m as it is now, under key.
func SealManifest(m *layout.Manifest, key *seal.Key) error {
	ad, err := manifestAD(m)
	if err != nil {
		return err
	}
	blob, err := seal.SealWith(seal.AlgNone, nil, nil, key, ad)
	if err != nil {
		return fmt.Errorf("seal manifest of machine %q: %w", m.Machine, err)
	}
	m.Seal = base64.StdEncoding.EncodeToString(blob)
	return nil
}

// VerifyManifest checks m.Seal with keys. A missing or wrong seal wraps
// ErrTampered; a seal under a key not in keys wraps seal.ErrUnknownKey
// too (a key created since keys were loaded).
func VerifyManifest(m *layout.Manifest, keys seal.Keyring) error {
	name := layout.ManifestName(m.Machine)
	if m.Seal == "" {
		return fmt.Errorf("%s %w: it is not sealed", name, ErrTampered)
	}
	blob, err := base64.StdEncoding.DecodeString(m.Seal)
	if err != nil {
		return fmt.Errorf("%s %w: its seal is not base64", name, ErrTampered)
	}
	ad, err := manifestAD(m)
	if err != nil {
		return err
	}
	if _, err := seal.Open(nil, blob, keys, ad); err != nil {
		if errors.Is(err, seal.ErrUnknownKey) {
			return fmt.Errorf("%s: %w", name, err)
		}
		return fmt.Errorf("%s %w; refusing to use it: %w", name, ErrTampered, err)
	}
	return nil
}
