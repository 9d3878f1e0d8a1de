package testenv

import (
	"fmt"
	"runtime"
	"strings"
	"testing"
)

// recorder captures how a check ended a test. Like the real testing.T it
// stops the goroutine on Skip/Fatal, so code after the call must not run.
type recorder struct {
	testing.TB
	fatal, skip string
}

func (r *recorder) Helper() {}
func (r *recorder) Fatalf(format string, args ...any) {
	r.fatal = fmt.Sprintf(format, args...)
	runtime.Goexit()
}
func (r *recorder) Skipf(format string, args ...any) {
	r.skip = fmt.Sprintf(format, args...)
	runtime.Goexit()
}

// run executes check in its own goroutine (Goexit must not end the test).
func run(check func(testing.TB)) (r *recorder, returned bool) {
	r = &recorder{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		check(r)
		returned = true
	}()
	<-done
	return r, returned
}

func TestRequireToolMissing(t *testing.T) {
	const tool = "lifeboat-no-such-tool-7f3a"
	check := func(tb testing.TB) { RequireTool(tb, tool) }

	t.Setenv("CI", "")
	r, returned := run(check)
	if returned || r.fatal != "" || !strings.Contains(r.skip, tool) {
		t.Errorf("without CI: returned=%v fatal=%q skip=%q; want skip naming the tool", returned, r.fatal, r.skip)
	}

	t.Setenv("CI", "true")
	r, returned = run(check)
	if returned || r.skip != "" || !strings.Contains(r.fatal, "CI=true so this must run") {
		t.Errorf("with CI=true: returned=%v fatal=%q skip=%q; want fatal", returned, r.fatal, r.skip)
	}
}

func TestRequireToolPresent(t *testing.T) {
	t.Setenv("CI", "true")
	var path string
	r, returned := run(func(tb testing.TB) { path = RequireTool(tb, "sh") })
	if !returned || r.fatal != "" || r.skip != "" || !strings.HasSuffix(path, "/sh") {
		t.Errorf("RequireTool(sh): returned=%v path=%q fatal=%q skip=%q", returned, path, r.fatal, r.skip)
	}
}
