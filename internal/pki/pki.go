// Package pki is Lifeboat's private certificate authority. Every component
// (agent, process server, config server, master target) authenticates with a
// certificate issued by one deployment CA, and the certificate says which
// role the holder plays. Connections are authorised by role, not by name: a
// process server accepts any agent certificate from its CA, and nothing else.
//
// A PKI directory holds:
//
//	ca.crt, ca.key          the CA (ca.key is needed only to issue)
//	<name>.crt, <name>.key  one identity per component
//	revoked                 serials of revoked certificates (Revoke), if any
//
// Keys are written with mode 0600 and are never logged or printed by this
// package.
package pki

import (
	"cmp"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"
)

const (
	caCertFile = "ca.crt"
	caKeyFile  = "ca.key"

	// roleScheme and rolePrefix form the URI SAN that carries the role,
	// e.g. "lifeboat:role/agent".
	roleScheme = "lifeboat"
	rolePrefix = "role/"

	caValidity = 10 * 365 * 24 * time.Hour
	// DefaultValidity is how long issued certificates are valid unless
	// WithValidity says otherwise. Replication stops when a certificate
	// expires, so it is deliberately long; monitor expiry (Identity.Leaf).
	DefaultValidity = 2 * 365 * 24 * time.Hour

	// clockSkew backdates NotBefore so that a freshly issued certificate is
	// accepted by a peer whose clock is slightly behind.
	clockSkew = 5 * time.Minute
)

// Role is the part a component plays. It is encoded in the certificate as
// the URI SAN "lifeboat:role/<role>".
type Role string

// The roles. The string values are part of issued certificates; never
// change them.
const (
	RoleAgent         Role = "agent"
	RoleProcessServer Role = "process-server"
	RoleConfigServer  Role = "config-server"
	RoleMasterTarget  Role = "master-target"
)

// Roles lists every valid role.
var Roles = []Role{RoleAgent, RoleProcessServer, RoleConfigServer, RoleMasterTarget}

// Valid reports whether r is one of Roles.
func (r Role) Valid() bool { return slices.Contains(Roles, r) }

// ParseRole returns the role named s, or an error listing the valid roles.
func ParseRole(s string) (Role, error) {
	if r := Role(s); r.Valid() {
		return r, nil
	}
	return "", fmt.Errorf("pki: unknown role %q (valid roles: %s)", s, roleList(Roles))
}

// isServer reports whether r listens for connections and therefore gets the
// loopback names in its certificate by default.
func (r Role) isServer() bool {
	return r == RoleProcessServer || r == RoleConfigServer
}

func (r Role) uri() *url.URL {
	return &url.URL{Scheme: roleScheme, Opaque: rolePrefix + string(r)}
}

// Init creates a new CA (ECDSA P-256) in dir, creating dir with mode 0700 if
// needed. It refuses to touch a directory that already holds a CA: replacing
// it would silently invalidate every certificate issued so far.
func Init(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("pki: create CA directory: %w", err)
	}
	for _, f := range []string{caKeyFile, caCertFile} {
		p := filepath.Join(dir, f)
		if _, err := os.Lstat(p); err == nil {
			return fmt.Errorf("pki: %s already exists; refusing to overwrite an existing CA (every issued certificate depends on it)", p)
		} else if !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("pki: check for existing CA: %w", err)
		}
	}

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("pki: generate CA key: %w", err)
	}
	serial, err := randomSerial()
	if err != nil {
		return err
	}
	// A random suffix makes the CA name unique per deployment, so an error
	// such as "issued by Lifeboat CA 1f2e…, expected Lifeboat CA 9a0b…" tells
	// the operator which deployment a stray certificate came from.
	suffix := make([]byte, 4)
	if _, err := rand.Read(suffix); err != nil {
		return fmt.Errorf("pki: generate CA name: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "Lifeboat CA " + hex.EncodeToString(suffix), Organization: []string{"Lifeboat"}},
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              now.Add(caValidity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true, // the CA issues leaves only
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return fmt.Errorf("pki: create CA certificate: %w", err)
	}
	return writePair(dir, "ca", der, key)
}

// IssueOption adjusts a certificate issued by Issue.
type IssueOption func(*issueOptions)

type issueOptions struct {
	hosts    []string
	validity time.Duration
}

// WithHosts adds DNS names or IP addresses the certificate is valid for, so
// that clients can verify a server by the name they dial.
func WithHosts(hosts ...string) IssueOption {
	return func(o *issueOptions) { o.hosts = append(o.hosts, hosts...) }
}

// WithValidity sets how long the certificate is valid (default
// DefaultValidity). It is capped at the CA's own expiry.
func WithValidity(d time.Duration) IssueOption {
	return func(o *issueOptions) { o.validity = d }
}

// Issue creates name.key (mode 0600) and name.crt in dir, signed by the CA in
// dir, for a component playing role. The certificate carries name as its
// common name and as a DNS SAN, and the role as a URI SAN. Server roles
// (process-server, config-server) are also valid for localhost, 127.0.0.1 and
// ::1. Issue refuses to overwrite an existing identity; delete both files to
// re-issue.
func Issue(dir, name string, role Role, opts ...IssueOption) error {
	if err := validateName(name); err != nil {
		return err
	}
	if !role.Valid() {
		return fmt.Errorf("pki: unknown role %q (valid roles: %s)", role, roleList(Roles))
	}
	o := issueOptions{validity: DefaultValidity}
	for _, opt := range opts {
		opt(&o)
	}
	if o.validity <= 0 {
		return fmt.Errorf("pki: validity must be positive, got %v", o.validity)
	}

	ca, caKey, err := loadCA(dir)
	if err != nil {
		return err
	}
	for _, f := range []string{name + ".key", name + ".crt"} {
		p := filepath.Join(dir, f)
		if _, err := os.Lstat(p); err == nil {
			return fmt.Errorf("pki: %s already exists; refusing to overwrite identity %q (remove %s.crt and %s.key to re-issue)", p, name, name, name)
		} else if !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("pki: check for existing identity: %w", err)
		}
	}

	hosts := []string{name}
	if role.isServer() {
		hosts = append(hosts, "localhost", "127.0.0.1", "::1")
	}
	hosts = append(hosts, o.hosts...)
	var dnsNames []string
	var ips []net.IP
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			if !slices.ContainsFunc(ips, ip.Equal) {
				ips = append(ips, ip)
			}
			continue
		}
		h = strings.ToLower(h)
		if err := validateDNSName(h); err != nil {
			return err
		}
		if !slices.Contains(dnsNames, h) {
			dnsNames = append(dnsNames, h)
		}
	}

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("pki: generate key for %q: %w", name, err)
	}
	serial, err := randomSerial()
	if err != nil {
		return err
	}
	now := time.Now()
	if !now.Before(ca.NotAfter) {
		return fmt.Errorf("pki: the CA in %s expired on %s: a certificate it issues would never be valid; make a new CA (lifeboat pki init) and issue every identity from it",
			dir, ca.NotAfter.UTC().Format(time.RFC3339))
	}
	notAfter := now.Add(o.validity)
	if notAfter.After(ca.NotAfter) {
		notAfter = ca.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject: pkix.Name{
			CommonName:         name,
			Organization:       []string{"Lifeboat"},
			OrganizationalUnit: []string{string(role)},
		},
		NotBefore: now.Add(-clockSkew),
		NotAfter:  notAfter,
		KeyUsage:  x509.KeyUsageDigitalSignature,
		// Both usages: most components are a server to one peer and a
		// client to another. Authorisation is by role, not by usage.
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		DNSNames:    dnsNames,
		IPAddresses: ips,
		URIs:        []*url.URL{role.uri()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, key.Public(), caKey)
	if err != nil {
		return fmt.Errorf("pki: sign certificate for %q: %w", name, err)
	}
	return writePair(dir, name, der, key)
}

// Identity is a loaded certificate and key plus the CA that peers must be
// issued by. Its String and LogValue show only the name and role, so it is
// safe to log.
type Identity struct {
	name    string
	role    Role
	cert    tls.Certificate // holds the private key; never expose
	leaf    *x509.Certificate
	ca      *x509.Certificate
	roots   *x509.CertPool
	revoked *revocations
	caKey   bool // ca.key lies in the directory too
}

// Load reads name.crt, name.key and ca.crt from dir. ca.key is not needed,
// so a component's directory should not contain it. Load fails if the
// certificate was not issued by the CA, is expired, or carries no valid role.
func Load(dir, name string) (*Identity, error) {
	if err := validateName(name); err != nil {
		return nil, err
	}
	ca, err := loadCACert(dir)
	if err != nil {
		return nil, err
	}
	certPath := filepath.Join(dir, name+".crt")
	keyPath := filepath.Join(dir, name+".key")
	// Group read is let through (a secret mounted 0640 or 0440 for a
	// group of its own); anything for others, or group write, is not.
	if fi, err := os.Stat(keyPath); err == nil && fi.Mode().Perm()&0o027 != 0 {
		return nil, fmt.Errorf("pki: %s is open to others (mode %#o): chmod 600 it", keyPath, fi.Mode().Perm())
	}
	cert, err := tls.LoadX509KeyPair(certPath, keyPath)
	if err != nil {
		return nil, fmt.Errorf("pki: load identity %q from %s: %w", name, dir, err)
	}
	leaf := cert.Leaf
	if leaf == nil { // Leaf is populated since Go 1.23; be defensive anyway.
		if leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return nil, fmt.Errorf("pki: parse %s: %w", certPath, err)
		}
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, fmt.Errorf("pki: %s: %w", certPath, describeVerifyError(leaf, ca, "", err))
	}
	certName, role, err := identityOf(leaf)
	if err != nil {
		return nil, fmt.Errorf("pki: %s: %w", certPath, err)
	}
	if certName != name {
		return nil, fmt.Errorf("pki: %s was issued to %q, not %q", certPath, certName, name)
	}
	rv := &revocations{path: filepath.Join(dir, revokedFile)}
	if err := rv.check(leaf); err != nil {
		return nil, fmt.Errorf("pki: %s: %w", certPath, err)
	}
	_, err = os.Stat(filepath.Join(dir, caKeyFile))
	return &Identity{name: name, role: role, cert: cert, leaf: leaf, ca: ca, roots: roots, revoked: rv, caKey: err == nil}, nil
}

// revokedFile lists revoked certificates, one "SERIAL NAME" line each
// (serial in hex; # starts a comment).
const revokedFile = "revoked"

// revocations is a PKI directory's revoked file, read again whenever it
// changes, so that a revocation copied there takes effect at the next
// handshake without a restart.
type revocations struct {
	path    string
	mu      sync.Mutex
	stamp   string // size and mtime of the file last read ("" none)
	serials map[string]string
	bad     error // a line of it that is no serial: every peer is refused
}

// Revoke adds the certificate of name in dir to dir's revoked file:
// peers loading a directory with that file refuse it from their next
// handshake on. The certificate stays on disk so it can be identified.
func Revoke(dir, name string) error {
	if err := validateName(name); err != nil {
		return err
	}
	certPath := filepath.Join(dir, name+".crt")
	pemBytes, err := os.ReadFile(certPath)
	if err != nil {
		return fmt.Errorf("pki: revoke %q: %w", name, err)
	}
	block, _ := pem.Decode(pemBytes)
	if block == nil {
		return fmt.Errorf("pki: revoke %q: %s holds no PEM certificate", name, certPath)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return fmt.Errorf("pki: revoke %q: %w", name, err)
	}
	line := fmt.Sprintf("%s %s\n", cert.SerialNumber.Text(16), name)
	old, err := os.ReadFile(filepath.Join(dir, revokedFile))
	if err == nil && strings.Contains("\n"+string(old), "\n"+line) {
		return nil // revoked already
	}
	if len(old) > 0 && old[len(old)-1] != '\n' {
		// A last line edited by hand without its newline would swallow
		// this one.
		line = "\n" + line
	}
	f, err := os.OpenFile(filepath.Join(dir, revokedFile), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("pki: revoke %q: %w", name, err)
	}
	_, err = f.WriteString(line)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("pki: revoke %q: %w", name, err)
	}
	return nil
}

// check fails if cert is revoked, or if the revoked file exists but
// cannot be read (a revocation must not be skipped silently).
func (r *revocations) check(cert *x509.Certificate) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	fi, err := os.Stat(r.path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		r.stamp, r.serials, r.bad = "", nil, nil
	case err != nil:
		return fmt.Errorf("pki: revocation list: %w", err)
	case fi.Mode().Perm()&0o022 != 0:
		// Anyone could take a revoked certificate off it.
		return fmt.Errorf("pki: revocation list %s is writable by others (mode %#o; it refuses every peer until fixed): chmod 644 it", r.path, fi.Mode().Perm())
	default:
		if stamp := fmt.Sprint(fi.Size(), fi.ModTime().UnixNano()); stamp != r.stamp {
			b, err := os.ReadFile(r.path)
			if err != nil {
				return fmt.Errorf("pki: revocation list: %w", err)
			}
			serials := map[string]string{}
			var bad error
			for i, line := range strings.Split(string(b), "\n") {
				line, _, _ = strings.Cut(line, "#")
				f := strings.Fields(line)
				if len(f) == 0 {
					continue
				}
				n, ok := new(big.Int).SetString(strings.ReplaceAll(f[0], ":", ""), 16)
				if !ok {
					// The other lines still count: a certificate they
					// list is revoked all the same.
					bad = cmp.Or(bad, fmt.Errorf("pki: revocation list %s, line %d: %q is not a hex serial number (the list refuses every peer until it is fixed)", r.path, i+1, f[0]))
					continue
				}
				// Normalised: OpenSSL prints serials with leading zeros
				// and colons.
				serials[n.Text(16)] = strings.Join(f[1:], " ")
			}
			r.stamp, r.serials, r.bad = stamp, serials, bad
		}
	}
	if name, ok := r.serials[cert.SerialNumber.Text(16)]; ok {
		return fmt.Errorf("pki: certificate %q (serial %s) %w (%s lists it as %q)", cert.Subject.CommonName, cert.SerialNumber.Text(16), ErrRevoked, r.path, name)
	}
	return r.bad
}

// ErrRevoked: the certificate is listed in the revoked file (other
// errors of a revocation check: the list could not be read).
var ErrRevoked = errors.New("is revoked")

// CheckRevoked fails if the identity's PKI directory lists cert as revoked
// (the list read again if it changed): for peers whose connection outlives
// the handshake that checked them.
func (id *Identity) CheckRevoked(cert *x509.Certificate) error { return id.revoked.check(cert) }

// Name returns the identity's name (the certificate's common name).
func (id *Identity) Name() string { return id.name }

// Role returns the role encoded in the identity's certificate.
func (id *Identity) Role() Role { return id.role }

// CAKeyNextTo reports whether the directory the identity was loaded from
// also holds the CA's private key, which a component never needs: whoever
// reads it there can issue certificates of any role.
func (id *Identity) CAKeyNextTo() bool { return id.caKey }

// Leaf returns the identity's certificate, e.g. to monitor NotAfter. The
// caller must not modify it.
func (id *Identity) Leaf() *x509.Certificate { return id.leaf }

// String returns "name (role)". It exists so that printing an Identity with
// %v never dumps the private key.
func (id *Identity) String() string { return fmt.Sprintf("%s (%s)", id.name, id.role) }

// GoString is like String, for %#v.
func (id *Identity) GoString() string { return "pki.Identity{" + id.String() + "}" }

// LogValue makes slog record an Identity as its name and role only.
func (id *Identity) LogValue() slog.Value {
	return slog.GroupValue(slog.String("name", id.name), slog.String("role", string(id.role)))
}

// ServerTLS returns a TLS 1.3-only server configuration that presents id and
// requires every client to present a certificate issued by id's CA whose role
// is one of allowed. A refused client gets a handshake error that names the
// expected CA or roles and what the client presented.
//
// ServerTLS panics if allowed is empty or contains an invalid role: that is a
// programming error, and failing at startup beats refusing every connection.
func (id *Identity) ServerTLS(allowed ...Role) *tls.Config {
	allowed = checkAllowed("ServerTLS", allowed)
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		MaxVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{id.cert},
		// The client certificate is verified in VerifyConnection instead of
		// by crypto/tls so that a refusal can say which CA and role were
		// expected. ClientCAs is left empty on purpose: if it were set, a Go
		// client holding a certificate from another CA would send no
		// certificate at all, and the error would not say why.
		ClientAuth: tls.RequireAnyClientCert,
		VerifyConnection: func(cs tls.ConnectionState) error {
			return id.verifyPeer(cs, "", x509.ExtKeyUsageClientAuth, allowed)
		},
	}
}

// ClientTLS returns a TLS 1.3-only client configuration that presents id and
// accepts only a server whose certificate was issued by id's CA, is valid for
// serverName (a DNS name or IP address; a ":port" suffix is ignored), and
// whose role is one of allowed.
//
// ClientTLS panics if serverName is empty, or if allowed is empty or contains
// an invalid role.
func (id *Identity) ClientTLS(serverName string, allowed ...Role) *tls.Config {
	allowed = checkAllowed("ClientTLS", allowed)
	if host, _, err := net.SplitHostPort(serverName); err == nil {
		serverName = host
	}
	if serverName == "" {
		panic("pki: ClientTLS called without a server name")
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		MaxVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{id.cert},
		ServerName:   serverName, // SNI; crypto/tls omits it for IP addresses
		// InsecureSkipVerify only disables crypto/tls's built-in check, which
		// VerifyConnection replaces with an equivalent one (same roots,
		// hostname and key usage) plus the role check; VerifyConnection runs
		// on every handshake, including resumed ones. This is the pattern of
		// crypto/tls's ExampleConfig_VerifyConnection.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			return id.verifyPeer(cs, serverName, x509.ExtKeyUsageServerAuth, allowed)
		},
	}
}

func checkAllowed(fn string, allowed []Role) []Role {
	if len(allowed) == 0 {
		panic("pki: " + fn + " called without any allowed peer role")
	}
	for _, r := range allowed {
		if !r.Valid() {
			panic(fmt.Sprintf("pki: %s called with unknown role %q", fn, r))
		}
	}
	// Copy so that the caller cannot change the policy after the fact.
	return append([]Role(nil), allowed...)
}

// verifyPeer checks the peer's chain against id's CA, its host name (if host
// is set) and key usage, then its role.
func (id *Identity) verifyPeer(cs tls.ConnectionState, host string, usage x509.ExtKeyUsage, allowed []Role) error {
	if len(cs.PeerCertificates) == 0 {
		return fmt.Errorf("pki: peer presented no certificate; expected one issued by %q with role %s", id.ca.Subject.CommonName, roleList(allowed))
	}
	leaf := cs.PeerCertificates[0]
	var inter *x509.CertPool
	if len(cs.PeerCertificates) > 1 {
		inter = x509.NewCertPool()
		for _, c := range cs.PeerCertificates[1:] {
			inter.AddCert(c)
		}
	}
	_, err := leaf.Verify(x509.VerifyOptions{
		Roots:         id.roots,
		Intermediates: inter,
		DNSName:       host,
		KeyUsages:     []x509.ExtKeyUsage{usage},
	})
	if err != nil {
		return describeVerifyError(leaf, id.ca, host, err)
	}
	name, role, err := identityOf(leaf)
	if err != nil {
		return err
	}
	if err := id.revoked.check(leaf); err != nil {
		return err
	}
	if slices.Contains(allowed, role) {
		return nil
	}
	return fmt.Errorf("pki: peer %q presented role %q; expected role %s", name, role, roleList(allowed))
}

// describeVerifyError turns x509's verification errors into messages that say
// what was expected and what the peer presented.
func describeVerifyError(leaf, ca *x509.Certificate, host string, err error) error {
	subject := leaf.Subject.CommonName
	var ua x509.UnknownAuthorityError
	var he x509.HostnameError
	var ci x509.CertificateInvalidError
	switch {
	case errors.As(err, &ua):
		return fmt.Errorf("pki: certificate %q was issued by %q, not by this deployment's CA %q: %w",
			subject, leaf.Issuer.CommonName, ca.Subject.CommonName, err)
	case errors.As(err, &he):
		return fmt.Errorf("pki: certificate %q is not valid for host %q (it covers DNS names %q and IP addresses %v): %w",
			subject, host, leaf.DNSNames, leaf.IPAddresses, err)
	case errors.As(err, &ci) && ci.Reason == x509.Expired:
		return fmt.Errorf("pki: certificate %q is valid only from %s to %s: %w",
			subject, leaf.NotBefore.UTC().Format(time.RFC3339), leaf.NotAfter.UTC().Format(time.RFC3339), err)
	default:
		return fmt.Errorf("pki: certificate %q failed verification: %w", subject, err)
	}
}

// PeerIdentity returns the name and role of the peer on a connection whose
// handshake has completed. It reads the peer's certificate without verifying
// it again, so it is meaningful only for connections made with a
// configuration from ServerTLS or ClientTLS, which verified it during the
// handshake.
func PeerIdentity(cs tls.ConnectionState) (name string, role Role, err error) {
	if !cs.HandshakeComplete {
		return "", "", errors.New("pki: TLS handshake not complete")
	}
	if len(cs.PeerCertificates) == 0 {
		return "", "", errors.New("pki: peer presented no certificate")
	}
	return identityOf(cs.PeerCertificates[0])
}

// identityOf extracts the name and the single role from a certificate.
func identityOf(c *x509.Certificate) (string, Role, error) {
	var role Role
	n := 0
	for _, u := range c.URIs {
		if u.Scheme != roleScheme || !strings.HasPrefix(u.Opaque, rolePrefix) {
			continue
		}
		role = Role(strings.TrimPrefix(u.Opaque, rolePrefix))
		n++
	}
	switch {
	case n == 0:
		return "", "", fmt.Errorf("pki: certificate %q carries no Lifeboat role (no %s:%s* URI)", c.Subject.CommonName, roleScheme, rolePrefix)
	case n > 1:
		return "", "", fmt.Errorf("pki: certificate %q carries %d roles; exactly one is allowed", c.Subject.CommonName, n)
	case !role.Valid():
		return "", "", fmt.Errorf("pki: certificate %q carries unknown role %q", c.Subject.CommonName, role)
	}
	return c.Subject.CommonName, role, nil
}

func loadCACert(dir string) (*x509.Certificate, error) {
	p := filepath.Join(dir, caCertFile)
	data, err := os.ReadFile(p)
	if err != nil {
		return nil, fmt.Errorf("pki: read CA certificate: %w", err)
	}
	block, _ := pem.Decode(data)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("pki: %s: no PEM CERTIFICATE block", p)
	}
	ca, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("pki: parse %s: %w", p, err)
	}
	if !ca.IsCA {
		return nil, fmt.Errorf("pki: %s is not a CA certificate", p)
	}
	return ca, nil
}

func loadCA(dir string) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	ca, err := loadCACert(dir)
	if err != nil {
		return nil, nil, err
	}
	p := filepath.Join(dir, caKeyFile)
	// As for an identity's key (Load): whoever reads it issues
	// certificates of any role.
	if fi, err := os.Stat(p); err == nil && fi.Mode().Perm()&0o027 != 0 {
		return nil, nil, fmt.Errorf("pki: %s is open to others (mode %#o): chmod 600 it", p, fi.Mode().Perm())
	}
	data, err := os.ReadFile(p)
	if err != nil {
		return nil, nil, fmt.Errorf("pki: read CA key: %w", err)
	}
	block, _ := pem.Decode(data)
	if block == nil || block.Type != "PRIVATE KEY" {
		return nil, nil, fmt.Errorf("pki: %s: no PEM PRIVATE KEY block", p)
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		// The parse error never contains key material.
		return nil, nil, fmt.Errorf("pki: parse %s: %w", p, err)
	}
	key, ok := k.(*ecdsa.PrivateKey)
	if !ok {
		return nil, nil, fmt.Errorf("pki: %s: unsupported CA key type %T", p, k)
	}
	if !key.PublicKey.Equal(ca.PublicKey) {
		return nil, nil, fmt.Errorf("pki: %s does not match %s", p, filepath.Join(dir, caCertFile))
	}
	return ca, key, nil
}

// writePair writes base.key (0600) then base.crt (0644), refusing to replace
// either; on failure it removes what it wrote so that a retry can succeed.
func writePair(dir, base string, certDER []byte, key *ecdsa.PrivateKey) error {
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("pki: encode key: %w", err)
	}
	keyPath := filepath.Join(dir, base+".key")
	certPath := filepath.Join(dir, base+".crt")
	if err := writeExclusive(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return err
	}
	if err := writeExclusive(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: certDER}), 0o644); err != nil {
		_ = os.Remove(keyPath)
		return err
	}
	return nil
}

// writeExclusive creates path (failing if it exists) with mode perm and
// syncs it. O_EXCL closes the race between the existence check and the
// write, and the file never exists with looser permissions than perm.
func writeExclusive(path string, data []byte, perm os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
	if err != nil {
		return fmt.Errorf("pki: create %s: %w", path, err)
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = os.Remove(path)
		return fmt.Errorf("pki: write %s: %w", path, err)
	}
	return nil
}

func randomSerial() (*big.Int, error) {
	s, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("pki: generate serial number: %w", err)
	}
	return s.Add(s, big.NewInt(1)), nil // serials must be positive
}

// CheckName reports whether name can name an identity (its files in the
// PKI directory, its certificate's common name).
func CheckName(name string) error { return validateName(name) }

// validateName accepts names that are safe both as file names and as DNS
// names: dot-separated labels of letters, digits and '-', at most 63 bytes.
func validateName(name string) error {
	if name == "ca" {
		return errors.New(`pki: the name "ca" is reserved for the CA`)
	}
	if len(name) > 63 {
		return fmt.Errorf("pki: name %q is longer than 63 bytes", name)
	}
	if err := validateDNSName(name); err != nil {
		return fmt.Errorf("pki: invalid name %q: use letters, digits, '-' and '.' (it is used as a file name and DNS name)", name)
	}
	return nil
}

// CheckHost refuses a --host that is neither an IP address nor a DNS
// name a certificate can carry.
func CheckHost(h string) error {
	if net.ParseIP(h) != nil {
		return nil
	}
	return validateDNSName(strings.ToLower(h))
}

func validateDNSName(h string) error {
	if h == "" || len(h) > 253 {
		return fmt.Errorf("pki: invalid host %q", h)
	}
	for _, label := range strings.Split(h, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return fmt.Errorf("pki: invalid host %q", h)
		}
		for _, c := range []byte(label) {
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-') {
				return fmt.Errorf("pki: invalid host %q", h)
			}
		}
	}
	return nil
}

func roleList(rs []Role) string {
	if len(rs) == 1 {
		return fmt.Sprintf("%q", rs[0])
	}
	q := make([]string, len(rs))
	for i, r := range rs {
		q[i] = fmt.Sprintf("%q", r)
	}
	return "one of " + strings.Join(q, ", ")
}

// ExpiryMetric is the gauge the process server and the agent export with
// their identity's NotAfter, and ExpiryMetricHelp its help.
const (
	ExpiryMetric     = "lifeboat_certificate_expiry_timestamp_seconds"
	ExpiryMetricHelp = "When this component's certificate (or its CA's, if that ends first) stops being accepted, in Unix seconds: past it, replication stops. Alert well before."
)

// ExpiryWarning is how long before a certificate's end Expiring warns.
const ExpiryWarning = 30 * 24 * time.Hour

// NotAfter returns when the identity stops being accepted: the end of its
// certificate or of its CA's, whichever comes first.
func (id *Identity) NotAfter() time.Time {
	t := id.leaf.NotAfter
	if id.ca != nil && id.ca.NotAfter.Before(t) {
		t = id.ca.NotAfter
	}
	return t
}

// Expiring returns a warning when a certificate (what names it) ending
// at notAfter ends within ExpiryWarning of now, or has ended; "" otherwise.
// Past its end, TLS refuses it, and replication stops.
func Expiring(what string, notAfter, now time.Time) string {
	left := notAfter.Sub(now)
	switch {
	case left <= 0:
		return fmt.Sprintf("%s expired on %s: issue a new one (lifeboat pki issue) and restart with it", what, notAfter.UTC().Format(time.RFC3339))
	case left < ExpiryWarning:
		in := "less than a day"
		if days := int(left.Hours() / 24); days > 0 {
			in = fmt.Sprintf("%d days", days)
		}
		return fmt.Sprintf("%s expires on %s, in %s: issue a new one (lifeboat pki issue) and restart with it before then, or replication stops", what, notAfter.UTC().Format(time.RFC3339), in)
	}
	return ""
}
