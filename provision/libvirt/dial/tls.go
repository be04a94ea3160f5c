package dial

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/user"
	"path/filepath"
	"time"
)

// tlsDialer reaches libvirtd for a qemu+tls:// URI with libvirt's PKI files: the CA's
// certificate (cacert.pem) to check the server by, and this client's (clientcert.pem,
// clientkey.pem), from ?pkipath=DIR, else where libvirt looks (~/.pki/libvirt for other
// users than root, then /etc/pki/CA and /etc/pki/libvirt). The server's certificate is
// always checked. Unlike go-libvirt's TLS dialer, every step is bounded by dialTime and
// the Connect's context, a server that stalls after the handshake included.
type tlsDialer struct {
	ctx  context.Context
	addr string
	conf *tls.Config
}

func newTLSDialer(ctx context.Context, u *url.URL) (*tlsDialer, error) {
	q := u.Query()
	if v := q.Get("no_verify"); v != "" && v != "0" {
		return nil, errors.New("no_verify turns off the check of the server's certificate, which libvirt-gci does not do")
	}
	if u.Hostname() == "" {
		return nil, errors.New("no host; want qemu+tls://host[:port]/system")
	}
	port := u.Port()
	if port == "" {
		port = "16514"
	}
	type paths struct{ ca, cert, key string }
	var search []paths
	if dir := q.Get("pkipath"); dir != "" {
		search = []paths{{filepath.Join(dir, "cacert.pem"), filepath.Join(dir, "clientcert.pem"), filepath.Join(dir, "clientkey.pem")}}
	} else {
		if me, err := user.Current(); err == nil && me.Uid != "0" {
			dir := filepath.Join(me.HomeDir, ".pki", "libvirt")
			search = append(search, paths{filepath.Join(dir, "cacert.pem"), filepath.Join(dir, "clientcert.pem"), filepath.Join(dir, "clientkey.pem")})
		}
		search = append(search, paths{"/etc/pki/CA/cacert.pem", "/etc/pki/libvirt/clientcert.pem", "/etc/pki/libvirt/private/clientkey.pem"})
	}
	var errs []error
	for _, p := range search {
		ca, err := os.ReadFile(p.ca)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		roots := x509.NewCertPool()
		if !roots.AppendCertsFromPEM(ca) {
			return nil, fmt.Errorf("%s: no certificate in it", p.ca)
		}
		cert, err := tls.LoadX509KeyPair(p.cert, p.key)
		if err != nil {
			return nil, fmt.Errorf("client certificate: %w", err)
		}
		return &tlsDialer{ctx: ctx, addr: net.JoinHostPort(u.Hostname(), port), conf: &tls.Config{
			ServerName:   u.Hostname(),
			RootCAs:      roots,
			Certificates: []tls.Certificate{cert},
			MinVersion:   tls.VersionTLS12,
		}}, nil
	}
	return nil, fmt.Errorf("no PKI files for TLS (name their directory with ?pkipath=DIR): %w", errors.Join(errs...))
}

// Dial connects, shakes hands, and reads libvirtd's one-byte verdict on this client's
// certificate.
func (d *tlsDialer) Dial() (net.Conn, error) {
	ctx, cancel := context.WithTimeout(d.ctx, dialTime)
	defer cancel()
	var nd net.Dialer
	raw, err := nd.DialContext(ctx, "tcp", d.addr)
	if err != nil {
		return nil, fmt.Errorf("tls %s: %w", d.addr, err)
	}
	c := tls.Client(raw, d.conf)
	if err := c.HandshakeContext(ctx); err != nil {
		_ = raw.Close()
		return nil, fmt.Errorf("tls %s: %w", d.addr, err)
	}
	deadline, _ := ctx.Deadline()
	_ = c.SetReadDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { _ = c.SetReadDeadline(time.Now()) })
	b := make([]byte, 1)
	_, err = c.Read(b)
	stop()
	if err != nil {
		_ = c.Close()
		return nil, fmt.Errorf("tls %s: no word from libvirtd after the handshake: %w", d.addr, err)
	}
	if b[0] != 1 {
		_ = c.Close()
		return nil, fmt.Errorf("tls %s: libvirtd refused this client's certificate", d.addr)
	}
	_ = c.SetReadDeadline(time.Time{})
	return c, nil
}
