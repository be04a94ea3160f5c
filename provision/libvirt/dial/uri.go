// Package dial turns a libvirt URI into the socket a go-libvirt client talks over: the
// local socket (go-libvirt's dialer), ssh and tls (ours: known_hosts checked
// strictly, no helper programs). It is also the one place that says what a URI's
// transport is, and so whether the libvirt it names is this host's.
package dial

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"

	"github.com/digitalocean/go-libvirt/socket"
	"github.com/digitalocean/go-libvirt/socket/dialers"
)

// Socket is which socket a libvirt URI is reached over: "unix" (this host's), "tcp",
// "tls" or "ssh" (or whatever else its scheme says: For refuses what it does not know).
// The rule is libvirt's: the part of the scheme after a "+", else tls for a URI with a
// host and the local socket for one without.
func Socket(u *url.URL) string {
	if _, t, ok := strings.Cut(u.Scheme, "+"); ok {
		return t
	}
	if u.Host != "" {
		return "tls"
	}
	return "unix"
}

// IsLocal tells whether the libvirt URI uri names this host's libvirt.
func IsLocal(uri string) bool {
	u, err := url.Parse(uri)
	return err == nil && Socket(u) == "unix"
}

// ReachesHost tells whether a connection to uri can open TCP connections on libvirtd's
// host (HostDialer): a local libvirt, or one over ssh.
func ReachesHost(uri string) bool {
	u, err := url.Parse(uri)
	return err == nil && (Socket(u) == "unix" || Socket(u) == "ssh")
}

// Public is uri as a job's log may show it: its scheme, user, host and path, without
// its query (key, known_hosts and PKI paths, sockets: the host's own business).
func Public(uri string) string {
	u, err := url.Parse(uri)
	if err != nil {
		return "(a libvirt URI)"
	}
	u.RawQuery, u.Fragment = "", ""
	if u.User != nil {
		u.User = url.User(u.User.Username())
	}
	return u.String()
}

// HostDialer is a dialer that also reaches TCP addresses as libvirtd's host sees them.
type HostDialer interface {
	DialHost(ctx context.Context, addr string) (net.Conn, error)
}

// ErrPlainTCP refuses qemu+tcp: go-libvirt authenticates only with "none" (or polkit on
// the local socket), so a libvirtd listening on tcp is one anybody who reaches its port
// drives as root (a guest on the hypervisor's NAT network does, through its gateway), and
// job scripts and tokens would cross the network in clear.
var ErrPlainTCP = errors.New("qemu+tcp:// is refused: it is a libvirtd without authentication or encryption, which any guest that reaches the host's port drives as root; use qemu+ssh:// (keyfile=, known_hosts=) or qemu+tls://")

// Check refuses a URI whose transport this tool does not speak, or will not (qemu+tcp).
func Check(uri string) error {
	u, err := url.Parse(uri)
	if err != nil || u.Scheme == "" {
		return fmt.Errorf("%q is not a URI; want one such as qemu:///system or qemu+ssh://user@host/system", uri)
	}
	t := Socket(u)
	if t == "tcp" {
		return fmt.Errorf("%s: %w", uri, ErrPlainTCP)
	}
	if _, ok := schemes[t]; !ok {
		return fmt.Errorf("%s: transport %q is not supported; want a local socket (qemu:///system), qemu+ssh:// or qemu+tls://", uri, t)
	}
	return nil
}

// schemes are the transports this tool speaks, each to the dialer of a URI.
var schemes = map[string]func(ctx context.Context, u *url.URL) (socket.Dialer, error){
	"unix": func(_ context.Context, u *url.URL) (socket.Dialer, error) {
		var opts []dialers.LocalOption
		if s := u.Query().Get("socket"); s != "" {
			opts = append(opts, dialers.WithSocket(s))
		}
		return local{dialers.NewLocal(opts...)}, nil
	},
	"tls": func(ctx context.Context, u *url.URL) (socket.Dialer, error) { return newTLSDialer(ctx, u) },
	"ssh": func(ctx context.Context, u *url.URL) (socket.Dialer, error) { return newSSHDialer(ctx, u) },
}

// For returns the dialer of the libvirt URI u. ctx bounds what it reads to get ready
// (keys, certificates); the dialer's Dial has bounds of its own. Where the transport
// reaches libvirtd's host (a local socket, ssh), the dialer is a HostDialer too.
func For(ctx context.Context, u *url.URL) (socket.Dialer, error) {
	if err := Check(u.String()); err != nil {
		return nil, err
	}
	return schemes[Socket(u)](ctx, u)
}

// local is go-libvirt's local dialer, and this host's TCP dialer.
type local struct{ *dialers.Local }

func (local) DialHost(ctx context.Context, addr string) (net.Conn, error) {
	var nd net.Dialer
	return nd.DialContext(ctx, "tcp", addr)
}
