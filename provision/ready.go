package provision

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/libvirt-gci/libvirt-gci/guest"
	"github.com/libvirt-gci/libvirt-gci/provision/libvirt"
	"github.com/libvirt-gci/libvirt-gci/template"
	"golang.org/x/crypto/ssh"
)

// "Ready" means ready for the job: beyond an answering agent, a guest with systemd has
// finished its boot, and each NIC the template gives the instance has its address (DHCP
// done, or a static one), after a boot as after a restore. Each wait is within the boot
// timeout, and says what it waited for and for how long.

// awaitSystem waits until systemd, where it is the guest's init, has finished booting.
// A degraded system is usable: it says so, with its failed units, in one line.
func (h *Host) awaitSystem(ctx context.Context, agent *guest.Agent) error {
	start := time.Now()
	st, err := agent.WaitSystem(ctx)
	if err != nil {
		return err
	}
	if !st.Systemd {
		return nil
	}
	took := time.Since(start)
	if st.State == "degraded" {
		h.Log.Warn(fmt.Sprintf("systemd finished booting degraded after %.1f s more: %s failed; the job runs all the same", took.Seconds(), failedUnits(st.Failed)),
			"system_ms", took.Milliseconds(), "state", st.State)
		return nil
	}
	h.Log.Info(fmt.Sprintf("systemd %s after %.1f s more", st.State, took.Seconds()), "system_ms", took.Milliseconds(), "state", st.State)
	return nil
}

func failedUnits(units []string) string {
	if len(units) == 0 {
		return "no unit named"
	}
	return strings.Join(units, ", ")
}

// awaitAddresses waits until each NIC of the instance's own whose link is up (the
// template's NICs; not the ssh NIC, which prepare configures itself) has an address.
func (h *Host) awaitAddresses(ctx context.Context, conn *libvirt.Conn, agent *guest.Agent, name string) error {
	x, err := conn.DomainXML(name, false)
	if err != nil {
		return err
	}
	nics, err := template.UpNICs(x)
	if err != nil {
		return fmt.Errorf("instance %q: %w", name, err)
	}
	if len(nics) == 0 {
		return nil
	}
	start := time.Now()
	var macs []string
	on := map[string]string{}
	for _, n := range nics {
		macs = append(macs, n.MAC)
		on[n.MAC] = n.Network
	}
	addrs, err := agent.WaitAddresses(ctx, macs)
	if err != nil {
		var named []string
		for _, n := range nics {
			named = append(named, n.MAC+" on "+n.Network)
		}
		if errors.Is(err, guest.ErrNotReady) {
			return fmt.Errorf("%w (the instance's NICs: %s)", err, strings.Join(named, "; "))
		}
		return err
	}
	took := time.Since(start)
	var got []string
	for _, a := range addrs {
		got = append(got, fmt.Sprintf("%s %s on %s", a.Device, a.Addr, on[a.MAC]))
	}
	h.Log.Info(fmt.Sprintf("network ready after %.1f s more: %s", took.Seconds(), strings.Join(got, "; ")), "network_ms", took.Milliseconds())
	return nil
}

// awaitReady waits, within the boot timeout, until the guest is ready for the job: its
// agent answers, systemd (where it runs) has finished booting, the guest is set up
// (setUp), each NIC of the template's has its address, and SSH answers if the instance
// has ssh access. Its last line says how long the launch that began then took.
func (h *Host) awaitReady(ctx context.Context, conn *libvirt.Conn, p *plan, begin time.Time) error {
	agent, err := guest.NewAgent(conn.API(), p.Name)
	if err != nil {
		return err
	}
	bctx, cancel := h.bootTimeout(ctx)
	defer cancel()
	bctx, cancelLoss := conn.WithLoss(bctx)
	defer cancelLoss()
	bctx, cancelWatch := conn.WatchDisks(bctx, p.Name)
	defer cancelWatch()
	err = h.awaitGuest(bctx, conn, agent, p, begin)
	if err != nil && ctx.Err() == nil {
		// Paused on a full pool: the watch ended the wait, or a wait failed on it first.
		if full := conn.DiskFull(p.Name); full != nil {
			return full
		}
	}
	return err
}

// awaitGuest is awaitReady's waits, in order, within ctx.
func (h *Host) awaitGuest(bctx context.Context, conn *libvirt.Conn, agent *guest.Agent, p *plan, begin time.Time) error {
	if err := h.awaitAgent(bctx, agent, begin); err != nil {
		return err
	}
	// Where systemd runs, its boot ends first: what the set-up changes (host keys, host
	// name) is not raced by the units that make them at boot.
	if p.Booted == "" {
		if err := h.awaitSystem(bctx, agent); err != nil {
			return err
		}
	} else if p.Booted == "running" {
		h.Log.Info("systemd running since the warm image's save; not waited for again", "system_ms", 0, "state", p.Booted)
	}
	access, hostKey, err := h.setUp(bctx, conn, agent, p)
	if err != nil {
		return err
	}
	if err := h.awaitAddresses(bctx, conn, agent, p.Name); err != nil {
		return err
	}
	if access != nil {
		sshStart := time.Now()
		if err := h.finishSSH(bctx, conn, agent, *access, hostKey, p.Transport); err != nil {
			return err
		}
		h.Log.Info(fmt.Sprintf("ssh ready after %.1f s more", time.Since(sshStart).Seconds()), "ssh_ready_ms", time.Since(sshStart).Milliseconds())
	}
	h.Log.Info(fmt.Sprintf("prepared %s in %.1f s", p.Name, time.Since(begin).Seconds()), "prepare_ms", time.Since(begin).Milliseconds())
	return nil
}

// awaitAgent waits until the guest agent answers.
func (h *Host) awaitAgent(ctx context.Context, agent *guest.Agent, begin time.Time) error {
	start := time.Now()
	if err := agent.WaitReady(ctx); err != nil {
		if errors.Is(context.Cause(ctx), libvirt.ErrLost) {
			return fmt.Errorf("waiting for its guest agent: %w", libvirt.ErrLost)
		}
		return err
	}
	took := time.Since(start)
	h.Log.Info(fmt.Sprintf("guest agent ready after %.1f s", took.Seconds()), "agent_ready_ms", took.Milliseconds(), "ready_ms", time.Since(begin).Milliseconds())
	return nil
}

// setUp makes, through the agent and in one command, what the guest needs before a
// stage runs (guestSetup), brings up the links of a restored instance's NICs, and says
// what it did. For an instance with ssh access it returns that access and the guest's
// host key.
func (h *Host) setUp(ctx context.Context, conn *libvirt.Conn, agent *guest.Agent, p *plan) (*sshAccess, ssh.PublicKey, error) {
	start := time.Now()
	var access *sshAccess
	if p.MAC != "" {
		a, err := h.sshAccess(conn, p.Name)
		if err != nil {
			return nil, nil, err
		}
		access = &a
	}
	setup := h.guestSetup(p, access)
	// A restored clone's NICs get their filters while its guest is set up (libvirt takes
	// seconds for one), before their links come up.
	filtered := make(chan error, 1)
	var filterTook time.Duration // written before the send on filtered
	if setup.Identity != nil {
		go func() {
			fstart := time.Now()
			err := conn.Filter(p.Name)
			filterTook = time.Since(fstart)
			filtered <- err
		}()
	} else {
		filtered <- nil
	}
	hostKey, err := agent.Setup(ctx, setup)
	guestTook := time.Since(start)
	select {
	case ferr := <-filtered:
		if err == nil {
			err = ferr
		}
	case <-ctx.Done(): // a stalled libvirtd: its call ends when the connection goes
		if err == nil {
			err = fmt.Errorf("the network filters of %s: %w", p.Name, context.Cause(ctx))
		}
	}
	if err != nil {
		return nil, nil, err
	}
	if setup.Identity != nil {
		if err := conn.LinksUp(p.Name, p.Links); err != nil {
			return nil, nil, err
		}
	}
	took := time.Since(start)
	parts := ""
	if filterTook > 0 {
		parts = fmt.Sprintf(" (the guest %d ms, its network filters %d ms beside it)", guestTook.Milliseconds(), filterTook.Milliseconds())
	}
	h.Log.Info(fmt.Sprintf("set up the guest (%s) in %d ms%s", strings.Join(h.setupSummary(p, setup), "; "), took.Milliseconds(), parts),
		"setup_ms", took.Milliseconds(), "setup_guest_ms", guestTook.Milliseconds(), "filter_ms", filterTook.Milliseconds())
	return access, hostKey, nil
}

// guestSetup is what the guest of p's instance is to be given: its host name and host
// keys always; its own identity after a restore; the helper, the cache share, and the
// NIC, user key and host names of its ssh access where it has them.
func (h *Host) guestSetup(p *plan, access *sshAccess) guest.Setup {
	setup := guest.Setup{Identity: p.Identity, Hostname: p.Name, HostKeys: true}
	if p.helper != "" {
		setup.Helper = &guest.Helper{Serial: HelperSerial, Dir: HelperDir, Name: "gitlab-runner"}
	}
	if p.Cache != "" {
		setup.Share = &guest.Share{Tag: CacheTag, Dir: p.CacheMount}
	}
	if access != nil {
		setup.NIC = &guest.NIC{MAC: p.MAC, Addr: SSHGuestAddr + "/" + strings.SplitN(SSHNet, "/", 2)[1]}
		setup.SSH = &guest.SSHAccess{User: h.SSHUser, AuthorizedKey: guest.AuthorizedKey(access.key.PublicKey(), "libvirt-gci@"+p.Name)}
		for _, f := range h.Forwards {
			if host, _, err := net.SplitHostPort(f); err == nil && net.ParseIP(host) == nil {
				setup.Hosts = append(setup.Hosts, host)
			}
		}
	}
	return setup
}

// setupSummary says, for the progress line, what setUp did.
func (h *Host) setupSummary(p *plan, setup guest.Setup) []string {
	did := []string{"host name " + p.Name, "its own SSH host key"}
	if id := setup.Identity; id != nil {
		did = append(did, fmt.Sprintf("its own clock, its RNG reseeded, machine-id and %d MAC addresses", len(id.MACs)))
	}
	if setup.Helper != nil {
		did = append(did, "gitlab-runner helper on its PATH")
	}
	if setup.Share != nil {
		did = append(did, fmt.Sprintf("its cache at %s over virtiofs", p.CacheMount))
	}
	if setup.SSH != nil {
		did = append(did, "its NIC and user key for ssh")
	}
	if len(h.Forwards) > 0 {
		did = append(did, "forwards to "+strings.Join(h.Forwards, ", "))
	}
	return did
}
