package provision

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/libvirt-gci/libvirt-gci/guest"
	"github.com/libvirt-gci/libvirt-gci/provision/libvirt"
	"github.com/libvirt-gci/libvirt-gci/provision/meta"
)

// sshAccess is what the guest needs for the ssh transport of the instance name: the
// forwarded port, the instance's own client key, and the NIC (with the MAC address mac)
// to configure.
type sshAccess struct {
	inst libvirt.Instance
	port int
	key  ssh.Signer
}

func (h *Host) sshAccess(conn *libvirt.Conn, name string) (sshAccess, error) {
	inst, err := conn.Lookup(name)
	if err != nil {
		return sshAccess{}, err
	}
	port, err := conn.ForwardedPort(name, 22)
	if err != nil {
		return sshAccess{}, err
	}
	key, err := h.clientKey(inst, true)
	if err != nil {
		return sshAccess{}, err
	}
	return sshAccess{inst, port, key}, nil
}

// finishSSH pins the guest's new host key and records the forwarded port in the
// metadata, and waits for an authenticated session.
func (h *Host) finishSSH(ctx context.Context, conn *libvirt.Conn, agent *guest.Agent, a sshAccess, hostKey ssh.PublicKey, transport string) error {
	m := a.inst.Metadata
	m.SSH = &meta.SSH{Host: "127.0.0.1", Port: a.port, User: h.SSHUser, HostKey: guest.AuthorizedKey(hostKey, a.inst.Name)}
	m.Transport = transport
	if err := conn.SetMetadata(a.inst.Name, m); err != nil {
		return err
	}
	s, err := sshTransport(conn, m.SSH, a.key)
	if err != nil {
		return err
	}
	s.Rekey = agent.ReloadSSHD
	return s.WaitReady(ctx)
}

// clientKey derives the instance's SSH client key; only a launch may create the secret.
func (h *Host) clientKey(inst libvirt.Instance, create bool) (ssh.Signer, error) {
	secret, err := guest.LoadSecret(h.SecretFile, create)
	if err != nil {
		return nil, err
	}
	return guest.ClientKey(secret, inst.UUID)
}

// sshTransport reaches the guest at info's address on libvirt's host, through conn.
func sshTransport(conn *libvirt.Conn, info *meta.SSH, key ssh.Signer) (*guest.SSH, error) {
	hostKey, _, _, _, err := ssh.ParseAuthorizedKey([]byte(info.HostKey))
	if err != nil {
		return nil, fmt.Errorf("pinned host key in the metadata: %w", err)
	}
	return &guest.SSH{
		Addr:    net.JoinHostPort(info.Host, strconv.Itoa(info.Port)),
		User:    info.User,
		Key:     key,
		HostKey: hostKey,
		Dial:    conn.DialHost,
	}, nil
}

// Session is an open instance: what its metadata says, and the transport its launch set
// up to reach it. Close it.
type Session struct {
	libvirt.Instance
	Transport string // meta.TransportAgent or meta.TransportSSH
	conn      *libvirt.Conn
	tr        guest.Transport
	ssh       *guest.SSH // where the instance has ssh access: for the forwards
	forwards  []string
	cancel    context.CancelFunc
}

// Open reaches the instance name, if allow agrees that it may (nil: any instance of
// ours). Its libvirt connection outlives ctx by AfterCancel: killing a script in the
// guest after a cancel needs it, but a stalled libvirtd must not keep a cancelled stage
// alive. A missing instance is ErrNoInstance.
func (h *Host) Open(ctx context.Context, name string, allow func(meta.Metadata) error) (_ *Session, err error) {
	cctx, cancel := lingering(ctx, AfterCancel)
	defer func() {
		if err != nil {
			cancel()
		}
	}()
	conn, err := h.Connect(cctx)
	if err != nil {
		return nil, err
	}
	s := &Session{conn: conn, cancel: cancel, Transport: meta.TransportAgent}
	defer func() {
		if err != nil {
			conn.Close()
		}
	}()
	if s.Instance, err = conn.Lookup(name); err != nil {
		return nil, err
	}
	if allow != nil {
		if err := allow(s.Metadata); err != nil {
			return nil, err
		}
	}
	// The transport is the one the launch set up, as the metadata says.
	if info := s.Metadata.SSH; info != nil {
		key, err := h.clientKey(s.Instance, false)
		if err != nil {
			return nil, err
		}
		if s.ssh, err = sshTransport(conn, info, key); err != nil {
			return nil, err
		}
		s.forwards = h.Forwards
		if s.Metadata.StageTransport() == meta.TransportSSH {
			s.tr, s.Transport = s.ssh, meta.TransportSSH
		}
	}
	if s.tr == nil {
		if s.tr, err = guest.NewAgent(conn.API(), name); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// Run runs script in the guest, its output streamed to stdout and stderr. A connection
// to libvirtd lost meanwhile is ErrLost.
func (s *Session) Run(ctx context.Context, script []byte, stdout, stderr io.Writer) (guest.ExitStatus, error) {
	if len(s.forwards) > 0 {
		f, err := s.ssh.Forward(ctx, s.forwards)
		if err != nil {
			return guest.ExitStatus{}, err
		}
		defer f.Close()
	}
	// A write the host could not store (the pool's file system full) pauses the VM:
	// the stage fails at once as the host's failure, not at the job's timeout.
	wctx, stop := s.conn.WatchDisks(ctx, s.Name)
	defer stop()
	st, err := s.tr.Run(wctx, script, stdout, stderr)
	var full *libvirt.DiskFullError
	switch {
	case ctx.Err() == nil && errors.As(context.Cause(wctx), &full):
		err = full
	case err == nil || ctx.Err() != nil:
	case s.Transport == meta.TransportAgent && s.conn.LostBy(err):
		err = fmt.Errorf("%w: %v", libvirt.ErrLost, err) // the agent's calls failed for that
	default:
		// The transport says what broke; libvirt says why, where the VM itself ended
		// under the stage (its QEMU killed, its guest powered off or panicked). An ssh
		// connection breaks the moment QEMU dies, a little before libvirt has seen it end.
		if full := s.conn.DiskFull(s.Name); full != nil {
			return st, full
		}
		why := s.conn.NotRunning(s.Name)
		for end := time.Now().Add(vmEndSeen); why == "" && time.Now().Before(end) && sleep(ctx, 100*time.Millisecond); {
			why = s.conn.NotRunning(s.Name)
		}
		if why != "" {
			err = fmt.Errorf("the VM is no longer running (%s): %w", why, err)
		}
	}
	return st, err
}

// vmEndSeen bounds how long a stage whose transport broke waits for libvirt to see
// whether its VM ended.
const vmEndSeen = 2 * time.Second

// MarkFailed records that a job's script failed in the instance, for Keep; once only.
func (s *Session) MarkFailed() error {
	if s.Metadata.FailedAt != "" {
		return nil
	}
	m := s.Metadata
	m.FailedAt = time.Now().UTC().Format(time.RFC3339)
	if err := s.conn.SetMetadata(s.Name, m); err != nil {
		return err
	}
	s.Metadata = m
	return nil
}

// Close disconnects.
func (s *Session) Close() error {
	err := s.conn.Close()
	s.cancel()
	return err
}

// Keep keeps the instance name for d instead of removing it, if a script failed in it
// (MarkFailed), allow agrees and the bounds on kept VMs (Limits.Kept, KeptPerProject)
// leave room; gc removes it afterwards, or once it is LIBVIRT_GCI_MAX_AGE old. A kept VM
// is stopped, its disks kept for a look, and its definition loses its cache share and
// its network (Conn.Disarm): a job must not outlive its timeout. Keep says until when,
// or zero and why not: then the caller removes it as usual.
func (h *Host) Keep(ctx context.Context, name string, allow func(meta.Metadata) error, d time.Duration) (time.Time, string, error) {
	after, cancel := lingering(ctx, AfterCancel)
	defer cancel()
	conn, err := h.Connect(after)
	if err != nil {
		return time.Time{}, "", err
	}
	defer conn.Close()
	inst, err := conn.Lookup(name)
	if err != nil || (allow != nil && allow(inst.Metadata) != nil) || inst.Metadata.FailedAt == "" {
		return time.Time{}, "", nil // the removal says what is wrong, if anything
	}
	if why, err := h.keptFull(conn, inst.Metadata.Owner); err != nil || why != "" {
		return time.Time{}, why, err
	}
	until := time.Now().Add(d).UTC().Truncate(time.Second)
	if created, err := time.Parse(time.RFC3339, inst.Metadata.CreatedAt); err == nil && h.MaxAge > 0 && created.Add(h.MaxAge).Before(until) {
		until = created.Add(h.MaxAge).UTC().Truncate(time.Second) // never past LIBVIRT_GCI_MAX_AGE
	}
	m := inst.Metadata
	m.KeepUntil = until.Format(time.RFC3339)
	if err := conn.SetMetadata(name, m); err != nil {
		return time.Time{}, "", err
	}
	if err := conn.Disarm(name); err != nil {
		return time.Time{}, "", err
	}
	return until, "", nil
}

// keptFull says why one more kept VM of owner's project does not fit, or "".
func (h *Host) keptFull(conn *libvirt.Conn, owner meta.Owner) (string, error) {
	list, err := conn.Instances()
	if err != nil {
		return "", err
	}
	all, mine := 0, 0
	for _, in := range list {
		if !strings.HasPrefix(in.Name, h.Prefix) || in.Metadata.KeepUntil == "" {
			continue
		}
		all++
		if o := in.Metadata.Owner; o.Server == owner.Server && o.ProjectID == owner.ProjectID && !o.Manual {
			mine++
		}
	}
	l := h.Limits
	switch {
	case l.KeptPerProject > 0 && mine >= l.KeptPerProject:
		return fmt.Sprintf("%d of %d kept VMs of this project (LIBVIRT_GCI_KEEP_FAILED_PER_PROJECT)", mine, l.KeptPerProject), nil
	case l.Kept > 0 && all >= l.Kept:
		return fmt.Sprintf("%d of %d kept VMs in all (LIBVIRT_GCI_KEEP_FAILED_MAX)", all, l.Kept), nil
	}
	return "", nil
}
