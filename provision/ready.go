package provision

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/libvirt-gci/libvirt-gci/guest"
	"github.com/libvirt-gci/libvirt-gci/template"
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
func (h *Host) awaitAddresses(ctx context.Context, conn *Conn, agent *guest.Agent, name string) error {
	dom, err := conn.api.DomainLookupByName(name)
	if err != nil {
		return fmt.Errorf("look up instance %q: %w", name, err)
	}
	x, err := conn.api.DomainGetXMLDesc(dom, 0)
	if err != nil {
		return fmt.Errorf("XML of %q: %w", name, err)
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
