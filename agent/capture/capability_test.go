package capture

import (
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

func TestLackingCapabilities(t *testing.T) {
	bpf, perfmon := uint64(1)<<unix.CAP_BPF, uint64(1)<<unix.CAP_PERFMON
	for _, c := range []struct {
		eff  uint64
		want string
	}{
		{^uint64(0), ""},
		{bpf | perfmon, ""},
		{perfmon | 1<<unix.CAP_SYS_ADMIN, "CAP_BPF"},
		{bpf, "CAP_PERFMON"},
		{0, "CAP_BPF CAP_PERFMON"},
	} {
		if got := strings.Join(lacking(c.eff), " "); got != c.want {
			t.Errorf("lacking(%#x) = %q, want %q", c.eff, got, c.want)
		}
	}
	// This process, as the tests run it (root), has both.
	t.Run("self", func(t *testing.T) {
		testenv.RequireRoot(t)
		if m, err := missingCapabilities(); err != nil || len(m) != 0 {
			t.Errorf("missingCapabilities() = %v, %v as root", m, err)
		}
	})
}
