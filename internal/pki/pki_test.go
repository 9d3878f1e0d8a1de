package pki

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// newPKI creates a CA in a temp dir and issues the given identities.
func newPKI(t *testing.T, ids map[string]Role) string {
	t.Helper()
	dir := t.TempDir()
	if err := Init(dir); err != nil {
		t.Fatalf("Init: %v", err)
	}
	for name, role := range ids {
		if err := Issue(dir, name, role); err != nil {
			t.Fatalf("Issue(%s, %s): %v", name, role, err)
		}
	}
	return dir
}

func mustLoad(t *testing.T, dir, name string) *Identity {
	t.Helper()
	id, err := Load(dir, name)
	if err != nil {
		t.Fatalf("Load(%s): %v", name, err)
	}
	return id
}

type handshakeResult struct {
	serverErr   error
	clientErr   error
	serverState tls.ConnectionState
	clientState tls.ConnectionState
}

// handshake runs a real TLS handshake over 127.0.0.1 and exchanges one
// message each way, so that a client certificate refused by the server (which
// TLS 1.3 reports only after the client's handshake returns) surfaces as a
// client error too.
func handshake(t *testing.T, serverCfg, clientCfg *tls.Config) handshakeResult {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()

	type srvOut struct {
		err   error
		state tls.ConnectionState
	}
	done := make(chan srvOut, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- srvOut{err: err}
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		tc := tls.Server(c, serverCfg)
		if err := tc.Handshake(); err != nil {
			done <- srvOut{err: err}
			return
		}
		buf := make([]byte, 4)
		if _, err := io.ReadFull(tc, buf); err != nil {
			done <- srvOut{err: fmt.Errorf("server read: %w", err)}
			return
		}
		if _, err := tc.Write([]byte("pong")); err != nil {
			done <- srvOut{err: fmt.Errorf("server write: %w", err)}
			return
		}
		done <- srvOut{state: tc.ConnectionState()}
	}()

	var res handshakeResult
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	tc := tls.Client(c, clientCfg)
	res.clientErr = tc.Handshake()
	if res.clientErr == nil {
		res.clientState = tc.ConnectionState()
		buf := make([]byte, 4)
		if _, err := tc.Write([]byte("ping")); err != nil {
			res.clientErr = err
		} else if _, err := io.ReadFull(tc, buf); err != nil {
			res.clientErr = err
		} else if string(buf) != "pong" {
			res.clientErr = fmt.Errorf("client read %q, want pong", buf)
		}
	}
	c.Close() // unblock the server if the client gave up
	out := <-done
	res.serverErr, res.serverState = out.err, out.state
	return res
}

func TestInitCreatesCAAndRefusesOverwrite(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pki")
	if err := Init(dir); err != nil {
		t.Fatal(err)
	}
	assertMode(t, filepath.Join(dir, "ca.key"), 0o600)
	assertMode(t, dir, 0o700|os.ModeDir)
	ca, key, err := loadCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !ca.IsCA || !ca.BasicConstraintsValid || !ca.MaxPathLenZero {
		t.Errorf("CA constraints: IsCA=%v BasicConstraintsValid=%v MaxPathLenZero=%v", ca.IsCA, ca.BasicConstraintsValid, ca.MaxPathLenZero)
	}
	if !strings.HasPrefix(ca.Subject.CommonName, "Lifeboat CA ") {
		t.Errorf("CA common name %q", ca.Subject.CommonName)
	}
	if key.Curve.Params().Name != "P-256" {
		t.Errorf("CA curve %s", key.Curve.Params().Name)
	}

	before, _ := os.ReadFile(filepath.Join(dir, "ca.key"))
	err = Init(dir)
	if err == nil || !strings.Contains(err.Error(), "refusing to overwrite") {
		t.Fatalf("second Init: got %v, want refusal", err)
	}
	after, _ := os.ReadFile(filepath.Join(dir, "ca.key"))
	if !bytes.Equal(before, after) {
		t.Fatal("second Init changed ca.key")
	}

	// A half-present CA (only the certificate) is refused too.
	dir2 := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir2, "ca.crt"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := Init(dir2); err == nil {
		t.Fatal("Init over an existing ca.crt succeeded")
	}
	if _, err := os.Stat(filepath.Join(dir2, "ca.key")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("refused Init left ca.key behind: %v", err)
	}
}

func TestIssue(t *testing.T) {
	dir := newPKI(t, map[string]Role{"web01": RoleAgent})
	if err := Issue(dir, "ps1", RoleProcessServer, WithHosts("ps1.dr.example.com", "10.0.0.7", "localhost")); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"web01", "ps1"} {
		assertMode(t, filepath.Join(dir, name+".key"), 0o600)
	}

	agent := mustLoad(t, dir, "web01")
	if agent.Name() != "web01" || agent.Role() != RoleAgent {
		t.Errorf("agent identity = %s", agent)
	}
	leaf := agent.Leaf()
	if got := leaf.URIs; len(got) != 1 || got[0].String() != "lifeboat:role/agent" {
		t.Errorf("agent URIs = %v", got)
	}
	if !slices.Equal(leaf.DNSNames, []string{"web01"}) || len(leaf.IPAddresses) != 0 {
		t.Errorf("agent SANs: DNS %v IP %v; want only web01", leaf.DNSNames, leaf.IPAddresses)
	}

	ps := mustLoad(t, dir, "ps1")
	leaf = ps.Leaf()
	if got := leaf.URIs; len(got) != 1 || got[0].String() != "lifeboat:role/process-server" {
		t.Errorf("process server URIs = %v", got)
	}
	for _, h := range []string{"ps1", "localhost", "127.0.0.1", "::1", "ps1.dr.example.com", "10.0.0.7"} {
		if err := leaf.VerifyHostname(h); err != nil {
			t.Errorf("process server certificate not valid for %s: %v", h, err)
		}
	}
	if n := len(leaf.DNSNames); n != 3 {
		t.Errorf("DNS SANs %v: duplicates not removed", leaf.DNSNames)
	}
	ca, _ := loadCACert(dir)
	if leaf.NotAfter.After(ca.NotAfter) {
		t.Errorf("leaf outlives CA: %v > %v", leaf.NotAfter, ca.NotAfter)
	}
}

func TestIssueRejects(t *testing.T) {
	dir := newPKI(t, map[string]Role{"web01": RoleAgent})
	tests := []struct {
		name, role string
		opts       []IssueOption
		want       string
	}{
		{"web01", "agent", nil, "refusing to overwrite"},
		{"../etc/passwd", "agent", nil, "invalid name"},
		{"a_b", "agent", nil, "invalid name"},
		{"ca", "agent", nil, "reserved"},
		{"", "agent", nil, "invalid name"},
		{"web02", "admin", nil, `unknown role "admin"`},
		{"web02", "agent", []IssueOption{WithHosts("bad host")}, "invalid host"},
		{"web02", "agent", []IssueOption{WithValidity(-time.Hour)}, "validity must be positive"},
	}
	for _, tt := range tests {
		err := Issue(dir, tt.name, Role(tt.role), tt.opts...)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("Issue(%q, %q): got %v, want error containing %q", tt.name, tt.role, err, tt.want)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "web02.key")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("rejected Issue left web02.key: %v", err)
	}
	if err := Issue(t.TempDir(), "web02", RoleAgent); err == nil || !strings.Contains(err.Error(), "read CA certificate") {
		t.Errorf("Issue without a CA: %v", err)
	}
}

func TestLoadRejects(t *testing.T) {
	dir := newPKI(t, map[string]Role{"web01": RoleAgent})
	other := newPKI(t, map[string]Role{"web01": RoleAgent})

	if _, err := Load(dir, "nope"); err == nil {
		t.Error("Load of a missing identity succeeded")
	}
	// An identity from another deployment's CA.
	copyFile(t, filepath.Join(other, "web01.crt"), filepath.Join(dir, "web01.crt"))
	copyFile(t, filepath.Join(other, "web01.key"), filepath.Join(dir, "web01.key"))
	_, err := Load(dir, "web01")
	if err == nil || !strings.Contains(err.Error(), "not by this deployment's CA") {
		t.Errorf("Load of a foreign certificate: %v", err)
	}
	// A certificate renamed to another identity.
	if err := Issue(dir, "web02", RoleAgent); err != nil {
		t.Fatal(err)
	}
	copyFile(t, filepath.Join(dir, "web02.crt"), filepath.Join(dir, "web03.crt"))
	copyFile(t, filepath.Join(dir, "web02.key"), filepath.Join(dir, "web03.key"))
	if _, err := Load(dir, "web03"); err == nil || !strings.Contains(err.Error(), `issued to "web02"`) {
		t.Errorf("Load of a renamed certificate: %v", err)
	}
	// A key that does not match the certificate.
	copyFile(t, filepath.Join(dir, "web02.key"), filepath.Join(dir, "web04.key"))
	if err := Issue(dir, "web05", RoleAgent); err != nil {
		t.Fatal(err)
	}
	copyFile(t, filepath.Join(dir, "web05.crt"), filepath.Join(dir, "web04.crt"))
	if _, err := Load(dir, "web04"); err == nil {
		t.Error("Load with a mismatched key succeeded")
	}
	// A key others may read.
	if err := os.Chmod(filepath.Join(dir, "web05.key"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(dir, "web05"); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Errorf("Load of a key readable by others: %v", err)
	}
}

func TestHandshakeAgentToProcessServer(t *testing.T) {
	dir := newPKI(t, map[string]Role{"web01": RoleAgent, "ps1": RoleProcessServer})
	agent, ps := mustLoad(t, dir, "web01"), mustLoad(t, dir, "ps1")

	for _, host := range []string{"localhost", "127.0.0.1", "ps1", "127.0.0.1:7443"} {
		res := handshake(t, ps.ServerTLS(RoleAgent), agent.ClientTLS(host, RoleProcessServer))
		if res.serverErr != nil || res.clientErr != nil {
			t.Fatalf("dial %s: server error %v, client error %v", host, res.serverErr, res.clientErr)
		}
		if v := res.clientState.Version; v != tls.VersionTLS13 {
			t.Errorf("negotiated %s, want TLS 1.3", tls.VersionName(v))
		}
		name, role, err := PeerIdentity(res.serverState)
		if err != nil || name != "web01" || role != RoleAgent {
			t.Errorf("server sees peer %q %q %v, want web01 agent", name, role, err)
		}
		name, role, err = PeerIdentity(res.clientState)
		if err != nil || name != "ps1" || role != RoleProcessServer {
			t.Errorf("client sees peer %q %q %v, want ps1 process-server", name, role, err)
		}
	}
}

func TestHandshakeRefusesOtherCA(t *testing.T) {
	dir := newPKI(t, map[string]Role{"web01": RoleAgent, "ps1": RoleProcessServer})
	evil := newPKI(t, map[string]Role{"web01": RoleAgent, "ps1": RoleProcessServer})
	agent, ps := mustLoad(t, dir, "web01"), mustLoad(t, dir, "ps1")
	evilAgent, evilPS := mustLoad(t, evil, "web01"), mustLoad(t, evil, "ps1")
	ca, _ := loadCACert(dir)
	evilCA, _ := loadCACert(evil)

	// A client certificate from another CA. The intruder skips verifying the
	// server, so that it is the server's check that is exercised.
	intruder := evilAgent.ClientTLS("localhost", RoleProcessServer)
	intruder.VerifyConnection = nil
	res := handshake(t, ps.ServerTLS(RoleAgent), intruder)
	if res.serverErr == nil {
		t.Fatal("server accepted a client certificate from another CA")
	}
	if res.clientErr == nil {
		t.Error("client did not see the refusal")
	}
	t.Logf("server refused foreign client: %v", res.serverErr)
	for _, want := range []string{"not by this deployment's CA", ca.Subject.CommonName, evilCA.Subject.CommonName} {
		if !strings.Contains(res.serverErr.Error(), want) {
			t.Errorf("server error %q does not mention %q", res.serverErr, want)
		}
	}

	// A server certificate from another CA.
	res = handshake(t, evilPS.ServerTLS(RoleAgent), agent.ClientTLS("localhost", RoleProcessServer))
	if res.clientErr == nil || !strings.Contains(res.clientErr.Error(), "not by this deployment's CA") {
		t.Errorf("client error %v, want refusal of the foreign server CA", res.clientErr)
	}
	if res.serverErr == nil {
		t.Error("server handshake succeeded although the client refused it")
	}
}

func TestHandshakeRefusesWrongRole(t *testing.T) {
	dir := newPKI(t, map[string]Role{
		"web01": RoleAgent, "ps1": RoleProcessServer, "ps2": RoleProcessServer, "cs1": RoleConfigServer,
	})
	agent, ps, ps2, cs := mustLoad(t, dir, "web01"), mustLoad(t, dir, "ps1"), mustLoad(t, dir, "ps2"), mustLoad(t, dir, "cs1")

	// A client presenting a process-server certificate to a server that
	// accepts only agents.
	res := handshake(t, ps.ServerTLS(RoleAgent), ps2.ClientTLS("localhost", RoleProcessServer))
	if res.serverErr == nil {
		t.Fatal("server accepted a process-server certificate where only agents are allowed")
	}
	t.Logf("server refused wrong role: %v", res.serverErr)
	for _, want := range []string{`presented role "process-server"`, `expected role "agent"`, `"ps2"`} {
		if !strings.Contains(res.serverErr.Error(), want) {
			t.Errorf("server error %q does not contain %q", res.serverErr, want)
		}
	}

	// An agent that reaches a config server where it expected a process
	// server refuses it.
	res = handshake(t, cs.ServerTLS(RoleAgent), agent.ClientTLS("localhost", RoleProcessServer))
	if res.clientErr == nil || !strings.Contains(res.clientErr.Error(), `presented role "config-server"; expected role "process-server"`) {
		t.Errorf("client error %v, want role refusal", res.clientErr)
	}

	// Several allowed roles are listed in the message.
	res = handshake(t, ps.ServerTLS(RoleAgent, RoleMasterTarget), cs.ClientTLS("localhost", RoleProcessServer))
	if res.serverErr == nil || !strings.Contains(res.serverErr.Error(), `expected role one of "agent", "master-target"`) {
		t.Errorf("server error %v, want list of allowed roles", res.serverErr)
	}
}

func TestHandshakeRefusesWrongHost(t *testing.T) {
	dir := newPKI(t, map[string]Role{"web01": RoleAgent, "ps1": RoleProcessServer})
	agent, ps := mustLoad(t, dir, "web01"), mustLoad(t, dir, "ps1")
	res := handshake(t, ps.ServerTLS(RoleAgent), agent.ClientTLS("ps9.example.com", RoleProcessServer))
	if res.clientErr == nil || !strings.Contains(res.clientErr.Error(), `not valid for host "ps9.example.com"`) {
		t.Errorf("client error %v, want host name refusal", res.clientErr)
	}
	// Agent certificates carry no loopback names, so an agent cannot pose as
	// a server on localhost even if the role check were relaxed.
	res = handshake(t, agent.ServerTLS(RoleAgent), agent.ClientTLS("localhost", RoleAgent))
	if res.clientErr == nil || !strings.Contains(res.clientErr.Error(), "not valid for host") {
		t.Errorf("client error %v, want host name refusal", res.clientErr)
	}
}

func TestHandshakeRefusesOldTLSAndNoClientCert(t *testing.T) {
	dir := newPKI(t, map[string]Role{"web01": RoleAgent, "ps1": RoleProcessServer})
	agent, ps := mustLoad(t, dir, "web01"), mustLoad(t, dir, "ps1")

	old := agent.ClientTLS("localhost", RoleProcessServer)
	old.MinVersion, old.MaxVersion = tls.VersionTLS12, tls.VersionTLS12
	if res := handshake(t, ps.ServerTLS(RoleAgent), old); res.serverErr == nil {
		t.Error("server accepted TLS 1.2")
	}

	anon := agent.ClientTLS("localhost", RoleProcessServer)
	anon.Certificates = nil
	res := handshake(t, ps.ServerTLS(RoleAgent), anon)
	if res.serverErr == nil {
		t.Fatal("server accepted a client without a certificate")
	}
}

func TestConfigPanicsOnMisuse(t *testing.T) {
	dir := newPKI(t, map[string]Role{"web01": RoleAgent})
	id := mustLoad(t, dir, "web01")
	for name, f := range map[string]func(){
		"server without roles": func() { id.ServerTLS() },
		"server bad role":      func() { id.ServerTLS("root") },
		"client without roles": func() { id.ClientTLS("localhost") },
		"client without host":  func() { id.ClientTLS("", RoleProcessServer) },
	} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("%s: no panic", name)
				}
			}()
			f()
		}()
	}
}

func TestIdentityDoesNotLeakKey(t *testing.T) {
	dir := newPKI(t, map[string]Role{"web01": RoleAgent})
	id := mustLoad(t, dir, "web01")
	raw, err := id.cert.PrivateKey.(*ecdsa.PrivateKey).Bytes()
	if err != nil {
		t.Fatal(err)
	}
	secrets := []string{hex.EncodeToString(raw), new(big.Int).SetBytes(raw).String(), "PRIVATE"}

	var logs bytes.Buffer
	slog.New(slog.NewTextHandler(&logs, nil)).Info("loaded", "identity", id)
	out := fmt.Sprintf("%v %+v %#v %s", id, id, id, id) + logs.String()
	for _, s := range secrets {
		if strings.Contains(out, s) {
			t.Fatalf("formatted identity leaks the private key: %s", out)
		}
	}
	if !strings.Contains(logs.String(), "identity.name=web01 identity.role=agent") {
		t.Errorf("log output %q lacks name and role", logs.String())
	}
}

func TestPeerIdentityRejectsBadCertificates(t *testing.T) {
	if _, _, err := PeerIdentity(tls.ConnectionState{}); err == nil {
		t.Error("PeerIdentity accepted an incomplete handshake")
	}
	cs := tls.ConnectionState{HandshakeComplete: true}
	if _, _, err := PeerIdentity(cs); err == nil {
		t.Error("PeerIdentity accepted a connection without peer certificate")
	}
	cs.PeerCertificates = []*x509.Certificate{{}}
	if _, _, err := PeerIdentity(cs); err == nil || !strings.Contains(err.Error(), "no Lifeboat role") {
		t.Errorf("PeerIdentity of a certificate without role: %v", err)
	}
	cs.PeerCertificates[0] = &x509.Certificate{URIs: []*url.URL{RoleAgent.uri(), RoleProcessServer.uri()}}
	if _, _, err := PeerIdentity(cs); err == nil || !strings.Contains(err.Error(), "2 roles") {
		t.Errorf("PeerIdentity of a certificate with two roles: %v", err)
	}
	cs.PeerCertificates[0] = &x509.Certificate{URIs: []*url.URL{{Scheme: "lifeboat", Opaque: "role/root"}}}
	if _, _, err := PeerIdentity(cs); err == nil || !strings.Contains(err.Error(), `unknown role "root"`) {
		t.Errorf("PeerIdentity of a certificate with an unknown role: %v", err)
	}
}

func assertMode(t *testing.T, path string, want os.FileMode) {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := fi.Mode(); got != want {
		t.Errorf("%s: mode %v, want %v", path, got, want)
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	data, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

// A revoked certificate is refused at the next handshake, by the side
// whose directory lists it, without reloading the identity; its holder
// cannot load it at all; a corrupt list refuses every peer.
func TestHandshakeRefusesRevoked(t *testing.T) {
	dir := newPKI(t, map[string]Role{"web01": RoleAgent, "web02": RoleAgent, "ps1": RoleProcessServer})
	agent, other, ps := mustLoad(t, dir, "web01"), mustLoad(t, dir, "web02"), mustLoad(t, dir, "ps1")
	if res := handshake(t, ps.ServerTLS(RoleAgent), agent.ClientTLS("ps1", RoleProcessServer)); res.serverErr != nil || res.clientErr != nil {
		t.Fatalf("before revocation: %v, %v", res.serverErr, res.clientErr)
	}
	for range 2 { // twice: listed once
		if err := Revoke(dir, "web01"); err != nil {
			t.Fatal(err)
		}
	}
	if b, err := os.ReadFile(filepath.Join(dir, revokedFile)); err != nil || strings.Count(string(b), " web01\n") != 1 {
		t.Fatalf("revoked file after revoking web01 twice: %q %v", b, err)
	}
	res := handshake(t, ps.ServerTLS(RoleAgent), agent.ClientTLS("ps1", RoleProcessServer))
	if res.serverErr == nil || !strings.Contains(res.serverErr.Error(), `certificate "web01"`) || !strings.Contains(res.serverErr.Error(), "is revoked") {
		t.Fatalf("revoked agent: server error %v", res.serverErr)
	}
	if res := handshake(t, ps.ServerTLS(RoleAgent), other.ClientTLS("ps1", RoleProcessServer)); res.serverErr != nil || res.clientErr != nil {
		t.Fatalf("another agent: %v, %v", res.serverErr, res.clientErr)
	}
	if _, err := Load(dir, "web01"); err == nil || !strings.Contains(err.Error(), "is revoked") {
		t.Fatalf("loading a revoked identity: %v", err)
	}
	if !other.CAKeyNextTo() {
		t.Error("loaded from the issuing directory, but CAKeyNextTo is false")
	}
	runtime := t.TempDir()
	for _, f := range []string{"ca.crt", "web02.crt", "web02.key"} {
		copyFile(t, filepath.Join(dir, f), filepath.Join(runtime, f))
	}
	if id := mustLoad(t, runtime, "web02"); id.CAKeyNextTo() {
		t.Error("a directory without ca.key: CAKeyNextTo is true")
	}
	// The agents refuse a revoked process server the same way.
	if err := Revoke(dir, "ps1"); err != nil {
		t.Fatal(err)
	}
	res = handshake(t, ps.ServerTLS(RoleAgent), other.ClientTLS("ps1", RoleProcessServer))
	if res.clientErr == nil || !strings.Contains(res.clientErr.Error(), "is revoked") {
		t.Fatalf("revoked process server: client error %v", res.clientErr)
	}
	// A serial as OpenSSL prints it (padded, with colons) matches too.
	serial := fmt.Sprintf("%x", other.Leaf().SerialNumber.Bytes())
	var colons []string
	for i := 0; i < len(serial); i += 2 {
		colons = append(colons, serial[i:i+2])
	}
	if err := os.WriteFile(filepath.Join(dir, revokedFile), []byte("00:"+strings.Join(colons, ":")+" web02\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(dir, "web02"); err == nil || !strings.Contains(err.Error(), "is revoked") {
		t.Fatalf("serial written as OpenSSL prints it: %v", err)
	}
	if err := os.WriteFile(filepath.Join(dir, revokedFile), []byte("not-hex web01\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	res = handshake(t, ps.ServerTLS(RoleAgent), other.ClientTLS("ps1", RoleProcessServer))
	if res.clientErr == nil || !strings.Contains(res.clientErr.Error(), "not a hex serial") { // the client checks first
		t.Fatalf("corrupt revocation list: client error %v", res.clientErr)
	}
	if err := Revoke(dir, "nobody"); err == nil {
		t.Fatal("revoked a certificate that does not exist")
	}
}

// A revocation list with a line that is no serial refuses every peer, but
// a certificate its other lines list is reported revoked all the same
// (ErrRevoked: a live session of it ends, where a list error does not).
func TestRevocationListWithBadLine(t *testing.T) {
	dir := newPKI(t, map[string]Role{"web01": RoleAgent, "web02": RoleAgent, "ps1": RoleProcessServer})
	revokedID, other, ps := mustLoad(t, dir, "web01"), mustLoad(t, dir, "web02"), mustLoad(t, dir, "ps1")
	if err := Revoke(dir, "web01"); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(filepath.Join(dir, revokedFile), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("0xZZ web09\n")
	f.Close()
	if err := ps.CheckRevoked(revokedID.Leaf()); !errors.Is(err, ErrRevoked) {
		t.Fatalf("revoked certificate with a bad line in the list: %v, want ErrRevoked", err)
	}
	if err := ps.CheckRevoked(other.Leaf()); err == nil || errors.Is(err, ErrRevoked) || !strings.Contains(err.Error(), "not a hex serial") {
		t.Fatalf("another certificate with a bad line in the list: %v, want the list's error", err)
	}
}

// A revocation appended to a list whose last line, edited by hand, lacks
// its newline is a line of its own, not swallowed by that one.
func TestRevokeAfterLineWithoutNewline(t *testing.T) {
	dir := newPKI(t, map[string]Role{"web01": RoleAgent, "ps1": RoleProcessServer})
	web01, ps := mustLoad(t, dir, "web01"), mustLoad(t, dir, "ps1")
	if err := os.WriteFile(filepath.Join(dir, revokedFile), []byte("1a alice"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := Revoke(dir, "web01"); err != nil {
		t.Fatal(err)
	}
	if err := ps.CheckRevoked(web01.Leaf()); !errors.Is(err, ErrRevoked) {
		t.Fatalf("web01 after its revocation: %v, want ErrRevoked", err)
	}
}

func TestExpiring(t *testing.T) {
	now := time.Date(2026, 11, 27, 0, 0, 0, 0, time.UTC)
	for _, c := range []struct {
		left time.Duration
		want string
	}{
		{-time.Hour, "expired on 2026-11-26T23:00:00Z"},
		{10 * 24 * time.Hour, "expires on 2026-12-07T00:00:00Z, in 10 days"},
		{ExpiryWarning + time.Hour, ""},
	} {
		got := Expiring("the agent's certificate", now.Add(c.left), now)
		if c.want == "" && got != "" || !strings.Contains(got, c.want) {
			t.Errorf("%v left: %q, want %q", c.left, got, c.want)
		}
	}
	dir := t.TempDir()
	if err := Init(dir); err != nil {
		t.Fatal(err)
	}
	if err := Issue(dir, "a", RoleAgent, WithValidity(24*time.Hour)); err != nil {
		t.Fatal(err)
	}
	id, err := Load(dir, "a")
	if err != nil {
		t.Fatal(err)
	}
	if !id.NotAfter().Equal(id.Leaf().NotAfter) || time.Until(id.NotAfter()) > 24*time.Hour {
		t.Fatalf("NotAfter %v, certificate's %v", id.NotAfter(), id.Leaf().NotAfter)
	}
}

// An expired CA issues nothing (before, the certificate was written valid
// at no time, NotAfter before NotBefore, and refused only where loaded);
// a CA key or a revocation list open to others is refused.
func TestIssueRefusesExpiredCAAndOpenFiles(t *testing.T) {
	dir := newPKI(t, map[string]Role{"web01": RoleAgent, "ps1": RoleProcessServer})
	ca, key, err := loadCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Join(dir, caKeyFile), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := Issue(dir, "web02", RoleAgent); err == nil || !strings.Contains(err.Error(), "open to others") {
		t.Fatalf("Issue with ca.key mode 0644: %v", err)
	}
	if err := os.Chmod(filepath.Join(dir, caKeyFile), 0o600); err != nil {
		t.Fatal(err)
	}

	web01, ps := mustLoad(t, dir, "web01"), mustLoad(t, dir, "ps1")
	if err := os.WriteFile(filepath.Join(dir, revokedFile), nil, 0o666); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Join(dir, revokedFile), 0o666); err != nil {
		t.Fatal(err)
	}
	if err := ps.CheckRevoked(web01.Leaf()); err == nil || !strings.Contains(err.Error(), "writable by others") {
		t.Fatalf("revocation list mode 0666: %v", err)
	}
	if err := os.Chmod(filepath.Join(dir, revokedFile), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := ps.CheckRevoked(web01.Leaf()); err != nil {
		t.Fatalf("revocation list mode 0644: %v", err)
	}

	tmpl := *ca
	tmpl.NotBefore, tmpl.NotAfter = time.Now().Add(-48*time.Hour), time.Now().Add(-time.Hour)
	der, err := x509.CreateCertificate(rand.Reader, &tmpl, &tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, caCertFile), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := Issue(dir, "web02", RoleAgent); err == nil || !strings.Contains(err.Error(), "expired") {
		t.Fatalf("Issue under an expired CA: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "web02.crt")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("refused Issue left web02.crt: %v", err)
	}
}
