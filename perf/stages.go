package perf

import (
	"context"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/google/pprof/profile"

	"github.com/lifeboat-dr/lifeboat/internal/stage"
)

// StageOther holds CPU samples without a stage label: the Go runtime's
// garbage collector, the metrics server, timers.
const StageOther = "other"

// BeforeUploadStages are the process server's stages before upload:
// receiving and caching (ingest), then reading back, compressing and
// encrypting (prepare).
var BeforeUploadStages = []string{stage.Ingest, stage.Prepare}

// profileStages records a CPU profile of the process server for d through
// its /debug/pprof/profile endpoint (base is the metrics server's URL
// without path) and returns CPU seconds per stage label. If keep is set,
// the profile is also written there.
func profileStages(ctx context.Context, base string, d time.Duration, keep string) (map[string]float64, error) {
	raw, err := fetchProfile(ctx, "process server", base, d, keep)
	if err != nil {
		return nil, err
	}
	p, err := profile.ParseData(raw)
	if err != nil {
		return nil, fmt.Errorf("process server CPU profile: %w", err)
	}
	return cpuByStage(p)
}

// fetchProfile records a CPU profile of role for d through its
// /debug/pprof/profile endpoint under base, writes it to keep if set, and
// returns it.
func fetchProfile(ctx context.Context, role, base string, d time.Duration, keep string) ([]byte, error) {
	secs := max(1, int(math.Round(d.Seconds())))
	ctx, cancel := context.WithTimeout(ctx, d+30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("%s/debug/pprof/profile?seconds=%d", base, secs), nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%s CPU profile: %w", role, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return nil, fmt.Errorf("%s CPU profile: %s: %s", role, resp.Status, strings.TrimSpace(string(msg)))
	}
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("%s CPU profile: %w", role, err)
	}
	if keep != "" {
		if err := os.WriteFile(keep, raw, 0o644); err != nil {
			return nil, err
		}
	}
	return raw, nil
}

// cpuByStage sums a CPU profile's sample time by stage label.
func cpuByStage(p *profile.Profile) (map[string]float64, error) {
	idx := -1
	for i, st := range p.SampleType {
		if st.Type == "cpu" && st.Unit == "nanoseconds" {
			idx = i
		}
	}
	if idx < 0 {
		return nil, fmt.Errorf("profile has no cpu/nanoseconds sample type")
	}
	out := map[string]float64{}
	for _, s := range p.Sample {
		name := StageOther
		if v := s.Label[stage.Key]; len(v) > 0 {
			name = v[0]
		}
		out[name] += float64(s.Value[idx]) / 1e9
	}
	return out, nil
}
