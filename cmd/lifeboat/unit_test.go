package main

import (
	"bufio"
	"os"
	"strings"
	"testing"
)

// The shipped systemd unit's command line is one the agent accepts, with
// app-consistent points off: the unit grants no CAP_SYS_ADMIN for fsfreeze.
func TestServiceUnitCommandLine(t *testing.T) {
	f, err := os.Open("../../deploy/lifeboat-agent.service")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var exec []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), "ExecStart="); ok {
			if strings.HasSuffix(v, "\\") {
				t.Fatal("ExecStart continues on the next line: keep it on one (this test reads one)")
			}
			exec = strings.Fields(v)
		}
	}
	if len(exec) < 3 || !strings.HasSuffix(exec[0], "/lifeboat") || exec[1] != "agent" {
		t.Fatalf("ExecStart %q: want /…/lifeboat agent …", exec)
	}
	var verbose bool
	cmd := agentCmd(&verbose)
	if err := cmd.ParseFlags(exec[2:]); err != nil {
		t.Fatalf("ExecStart flags: %v", err)
	}
	if err := cmd.ValidateRequiredFlags(); err != nil {
		t.Fatalf("ExecStart flags: %v", err)
	}
	if err := cmd.ValidateArgs(cmd.Flags().Args()); err != nil {
		t.Fatalf("ExecStart arguments: %v", err)
	}
	if got := cmd.Flags().Lookup("app-interval").Value.String(); got != "0s" {
		t.Errorf("unit takes app-consistent points every %s, but grants no CAP_SYS_ADMIN for fsfreeze", got)
	}
}
