package processserver

import (
	"log/slog"
	"net"
	"sync"
	"time"
)

// Limits on connections whose TLS handshake is under way: before it ends,
// nothing about a peer is known, and each holds a goroutine, a descriptor
// and handshake state. A peer without a certificate opening connections
// that stall must not exhaust them, nor the log.
var (
	handshakeTimeout = 10 * time.Second // to finish the TLS handshake
	maxHandshakes    = 512              // in flight, in all
	maxHandshakesIP  = 32               // in flight, from one address
)

// handshakes counts the handshakes in flight, and spaces the warnings of
// refused or failed ones.
type handshakes struct {
	mu    sync.Mutex
	total int
	byIP  map[string]int

	logMu      sync.Mutex
	logged     time.Time // last warn call
	tokens     float64
	suppressed int
}

// admit takes a slot for a handshake from addr; false when the limits are
// reached (the connection is then closed unanswered).
func (h *handshakes) admit(addr net.Addr) (release func(), ok bool) {
	ip := hostOf(addr)
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.total >= maxHandshakes || h.byIP[ip] >= maxHandshakesIP {
		return nil, false
	}
	if h.byIP == nil {
		h.byIP = make(map[string]int)
	}
	h.total++
	h.byIP[ip]++
	return func() {
		h.mu.Lock()
		defer h.mu.Unlock()
		h.total--
		if h.byIP[ip]--; h.byIP[ip] == 0 {
			delete(h.byIP, ip)
		}
	}, true
}

// Warnings of refused and failed handshakes: a burst of warnBurst, then
// one per warnEvery (a token bucket), saying how many went unlogged.
const (
	warnBurst = 20
	warnEvery = time.Second
)

// warn logs a refused or failed handshake, within the bucket's limits.
func (h *handshakes) warn(log *slog.Logger, msg string, args ...any) {
	h.logMu.Lock()
	now := time.Now()
	if h.logged.IsZero() {
		h.tokens = warnBurst
	} else {
		h.tokens = min(warnBurst, h.tokens+now.Sub(h.logged).Seconds()/warnEvery.Seconds())
	}
	h.logged = now
	if h.tokens < 1 {
		h.suppressed++
		h.logMu.Unlock()
		return
	}
	h.tokens--
	n := h.suppressed
	h.suppressed = 0
	h.logMu.Unlock()
	if n > 0 {
		args = append(args, "unlogged_since_last", n)
	}
	log.Warn(msg, args...)
}

func hostOf(addr net.Addr) string {
	if a, ok := addr.(*net.TCPAddr); ok {
		return a.IP.String()
	}
	host, _, err := net.SplitHostPort(addr.String())
	if err != nil {
		return addr.String()
	}
	return host
}
