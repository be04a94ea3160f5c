package dial

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/user"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/agent"
	"golang.org/x/crypto/ssh/knownhosts"
)

// dialTime bounds the TCP connect and the SSH or TLS handshake with a remote libvirt: a
// host that is down or stalled is given up on after it.
var dialTime = 10 * time.Second

// defaultLibvirtSocket is libvirtd's socket on a hypervisor reached over SSH.
const defaultLibvirtSocket = "/var/run/libvirt/libvirt-sock"

// sshDialer reaches libvirtd on another host for a qemu+ssh:// URI: an SSH connection to
// the host, checked against known_hosts (strictly: an unknown or changed host key is
// refused), and in it a channel to libvirtd's socket there (OpenSSH's streamlocal
// forwarding). Closing the libvirt connection closes the SSH connection. The same SSH
// connection carries the channels to the instances' forwarded SSH ports on that host's
// 127.0.0.1 (DialHost): they are never opened to the network.
type sshDialer struct {
	ctx    context.Context // the Connect's: a dial in flight ends with it
	addr   string          // host:port
	user   string
	socket string
	keys   []ssh.Signer // keyfile's, or the usual key files'
	agent  string       // ssh-agent's socket, without keyfile
	known  []string     // known_hosts files
	check  ssh.HostKeyCallback

	mu     sync.Mutex
	client *ssh.Client
}

// newSSHDialer reads a qemu+ssh URI's parameters: libvirt's own (keyfile, known_hosts,
// socket), so that the URI works with virsh -c too. Those that turn host key checking off
// are refused.
func newSSHDialer(ctx context.Context, u *url.URL) (*sshDialer, error) {
	q := u.Query()
	if q.Get("no_verify") != "" && q.Get("no_verify") != "0" {
		return nil, errors.New("no_verify turns off host key checking, which libvirt-gci does not do; put the host's key in known_hosts instead")
	}
	if v := q.Get("known_hosts_verify"); v != "" && v != "normal" {
		return nil, fmt.Errorf("known_hosts_verify=%s is not supported; host keys are always checked against known_hosts (normal)", v)
	}
	me, err := user.Current()
	if err != nil {
		return nil, err
	}
	d := &sshDialer{ctx: ctx, user: u.User.Username(), socket: q.Get("socket")}
	if d.user == "" {
		d.user = me.Username
	}
	if d.socket == "" {
		d.socket = defaultLibvirtSocket
	}
	port := u.Port()
	if port == "" {
		port = "22"
	}
	if u.Hostname() == "" {
		return nil, errors.New("no host; want qemu+ssh://[user@]host[:port]/system")
	}
	d.addr = net.JoinHostPort(u.Hostname(), port)

	if f := q.Get("known_hosts"); f != "" {
		d.known = []string{f}
	} else {
		for _, f := range []string{filepath.Join(me.HomeDir, ".ssh", "known_hosts"), "/etc/ssh/ssh_known_hosts"} {
			if _, err := os.Stat(f); err == nil {
				d.known = append(d.known, f)
			}
		}
		if len(d.known) == 0 {
			return nil, fmt.Errorf("no known_hosts file (%s) to check %s's host key against; add one, or name one with ?known_hosts=PATH", filepath.Join(me.HomeDir, ".ssh", "known_hosts"), d.addr)
		}
	}
	if d.check, err = knownhosts.New(d.known...); err != nil {
		return nil, fmt.Errorf("known_hosts: %w", err)
	}

	if f := q.Get("keyfile"); f != "" {
		signer, err := readKey(f)
		if err != nil {
			return nil, err
		}
		d.keys = []ssh.Signer{signer}
		return d, nil
	}
	// As ssh(1) does without -i: the agent's keys, then the usual key files.
	d.agent = os.Getenv("SSH_AUTH_SOCK")
	for _, n := range []string{"id_ed25519", "id_ecdsa", "id_rsa"} {
		if s, err := readKey(filepath.Join(me.HomeDir, ".ssh", n)); err == nil {
			d.keys = append(d.keys, s)
		}
	}
	if d.agent == "" && len(d.keys) == 0 {
		return nil, fmt.Errorf("no SSH key for %s@%s: no agent (SSH_AUTH_SOCK) and no ~/.ssh/id_ed25519, id_ecdsa or id_rsa without a passphrase; name one with ?keyfile=PATH", d.user, d.addr)
	}
	return d, nil
}

func readKey(path string) (ssh.Signer, error) {
	pem, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("ssh key: %w", err)
	}
	s, err := ssh.ParsePrivateKey(pem)
	if err != nil {
		return nil, fmt.Errorf("ssh key %s: %w (a key with a passphrase must come from ssh-agent)", path, err)
	}
	return s, nil
}

// HypervisorKeyError: the hypervisor's host key is unknown, or not the one known_hosts has.
type HypervisorKeyError struct {
	Addr  string
	Got   string   // SHA256 fingerprint
	Want  []string // known_hosts' keys for the host: none if it is unknown
	Files []string
}

func (e *HypervisorKeyError) Error() string {
	if len(e.Want) == 0 {
		return fmt.Sprintf("%s is not in %s (it offered %s); refusing to connect: add its key there once you have checked it", e.Addr, strings.Join(e.Files, ", "), e.Got)
	}
	return fmt.Sprintf("host key mismatch at %s: it offered %s, but %s has %s; refusing to connect (was the host reinstalled, or is something else answering there?)", e.Addr, e.Got, strings.Join(e.Files, ", "), strings.Join(e.Want, ", "))
}

// algorithms are the host key algorithms known_hosts has for the host, so that the
// server offers the key known_hosts knows rather than another of its keys.
func (d *sshDialer) algorithms(remote net.Addr) []string {
	var kerr *knownhosts.KeyError
	if err := d.check(d.addr, remote, probeKey{}); !errors.As(err, &kerr) {
		return nil
	}
	var algos []string
	for _, k := range kerr.Want {
		switch t := k.Key.Type(); t {
		case ssh.KeyAlgoRSA:
			algos = append(algos, ssh.KeyAlgoRSASHA512, ssh.KeyAlgoRSASHA256, t)
		default:
			algos = append(algos, t)
		}
	}
	return algos
}

// probeKey is no one's key: checking it tells which keys known_hosts has for a host.
type probeKey struct{}

func (probeKey) Type() string                            { return "probe" }
func (probeKey) Marshal() []byte                         { return []byte("libvirt-gci probe") }
func (probeKey) Verify(_ []byte, _ *ssh.Signature) error { return errors.New("probe") }

// hostKey is the HostKeyCallback: known_hosts decides, with an error that says what to do.
func (d *sshDialer) hostKey(host string, remote net.Addr, key ssh.PublicKey) error {
	err := d.check(host, remote, key)
	var kerr *knownhosts.KeyError
	if errors.As(err, &kerr) {
		e := &HypervisorKeyError{Addr: d.addr, Got: ssh.FingerprintSHA256(key), Files: d.known}
		for _, k := range kerr.Want {
			e.Want = append(e.Want, ssh.FingerprintSHA256(k.Key))
		}
		return e
	}
	return err
}

// auth is how the handshake authenticates; done closes what it opened (the agent's
// connection, needed only for the handshake).
func (d *sshDialer) auth() (methods []ssh.AuthMethod, done func()) {
	done = func() {}
	if d.agent != "" {
		if c, err := net.DialTimeout("unix", d.agent, dialTime); err == nil {
			_ = c.SetDeadline(time.Now().Add(dialTime)) // a stalled agent stalls no handshake
			methods = append(methods, ssh.PublicKeysCallback(agent.NewClient(c).Signers))
			done = func() { _ = c.Close() }
		}
	}
	if len(d.keys) > 0 {
		methods = append(methods, ssh.PublicKeys(d.keys...))
	}
	return methods, done
}

// Dial opens the SSH connection and, in it, a channel to libvirtd's socket.
func (d *sshDialer) Dial() (net.Conn, error) {
	ctx, cancel := context.WithTimeout(d.ctx, dialTime)
	defer cancel()
	var nd net.Dialer
	c, err := nd.DialContext(ctx, "tcp", d.addr)
	if err != nil {
		return nil, fmt.Errorf("ssh %s: %w", d.addr, err)
	}
	stop := context.AfterFunc(ctx, func() { _ = c.Close() })
	defer stop()
	var hkErr *HypervisorKeyError
	auth, authDone := d.auth()
	defer authDone()
	cc, chans, reqs, err := ssh.NewClientConn(c, d.addr, &ssh.ClientConfig{
		User: d.user,
		Auth: auth,
		HostKeyCallback: func(host string, remote net.Addr, key ssh.PublicKey) error {
			err := d.hostKey(host, remote, key)
			errors.As(err, &hkErr)
			return err
		},
		HostKeyAlgorithms: d.algorithms(c.RemoteAddr()),
		Timeout:           dialTime,
	})
	if err != nil {
		_ = c.Close()
		switch {
		case hkErr != nil:
			return nil, hkErr
		case ctx.Err() != nil:
			return nil, fmt.Errorf("ssh %s: no answer within %s: %w", d.addr, dialTime, context.Cause(ctx))
		}
		return nil, fmt.Errorf("ssh %s@%s: %w", d.user, d.addr, err)
	}
	if !stop() { // ctx ended as the handshake finished: c is closed
		_ = cc.Close()
		return nil, fmt.Errorf("ssh %s: %w", d.addr, context.Cause(ctx))
	}
	client := ssh.NewClient(cc, chans, reqs)
	ch, err := client.DialContext(ctx, "unix", d.socket)
	if err != nil {
		_ = client.Close()
		return nil, fmt.Errorf("ssh %s: libvirtd's socket %s there (does sshd allow streamlocal forwarding, and may %s use the socket?): %w", d.addr, d.socket, d.user, err)
	}
	d.mu.Lock()
	d.client = client
	d.mu.Unlock()
	return &sshConn{Conn: ch, client: client}, nil
}

// DialHost opens a channel, through the SSH connection, to addr as the hypervisor sees it
// (an instance's forward on its 127.0.0.1).
func (d *sshDialer) DialHost(ctx context.Context, addr string) (net.Conn, error) {
	d.mu.Lock()
	client := d.client
	d.mu.Unlock()
	if client == nil {
		return nil, fmt.Errorf("ssh %s: not connected", d.addr)
	}
	c, err := client.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("%s on the hypervisor %s: %w", addr, d.addr, err)
	}
	return c, nil
}

// sshConn is the channel to libvirtd; closing it closes the SSH connection.
type sshConn struct {
	net.Conn
	client *ssh.Client
}

func (c *sshConn) Close() error {
	err := c.Conn.Close()
	_ = c.client.Close() // closing twice is harmless
	return err
}
