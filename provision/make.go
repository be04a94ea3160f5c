package provision

import (
	"context"
	"fmt"
	"os/exec"
	"time"

	"github.com/libvirt-gci/libvirt-gci/guest"
	"github.com/libvirt-gci/libvirt-gci/provision/libvirt"
)

// MakeTemplate turns the domain name, a VM prepared by hand, into a template: its
// machine identity reset (through its guest agent if it runs; with virt-sysprep, where
// the host has it, if it is shut off), shut down, and marked. It never touches an
// instance, and never forces a guest off: one that does not shut down within the boot
// timeout is left running, with an error.
func (h *Host) MakeTemplate(ctx context.Context, name string) error {
	conn, err := h.Connect(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	info, err := conn.TemplateOf(name)
	if err != nil {
		return err
	}
	if info.Instance {
		return fmt.Errorf("%q is a libvirt-gci instance; make a template of the VM you prepared, not of a clone", name)
	}
	bctx, cancel := h.bootTimeout(ctx)
	defer cancel()
	if info.Shutoff {
		if err := sysprep(bctx, h.URI, name); err != nil {
			return err
		}
		h.Log.Info(fmt.Sprintf("reset the machine identity of %s with virt-sysprep", name))
	} else {
		agent, err := guest.NewAgent(conn.API(), name)
		if err != nil {
			return err
		}
		if err := agent.WaitReady(bctx); err != nil {
			return fmt.Errorf("%s: %w (the guest agent resets its identity; or shut it off and install virt-sysprep)", name, err)
		}
		if err := agent.ResetIdentity(bctx); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		h.Log.Info(fmt.Sprintf("reset the machine identity of %s (machine-id, ssh host keys, logs, DHCP leases)", name))
		if err := shutdown(bctx, conn, name, agent); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		h.Log.Info(fmt.Sprintf("shut %s down", name))
	}
	if err := conn.MarkTemplate(name, true); err != nil {
		return err
	}
	h.Log.Info(fmt.Sprintf("marked %s as a template: jobs may clone it", name))
	return nil
}

// shutdown asks the guest to power off (the agent's shutdown, else a poweroff command
// through the agent, else ACPI) and waits until it has, or ctx ends.
func shutdown(ctx context.Context, conn *libvirt.Conn, name string, agent *guest.Agent) error {
	if err := conn.Shutdown(name, true); err != nil {
		if err := agent.PowerOff(ctx); err != nil {
			if err := conn.Shutdown(name, false); err != nil {
				return fmt.Errorf("shut down: %w", err)
			}
		}
	}
	for {
		off, err := conn.ShutOff(name)
		if err != nil {
			return err
		}
		if off {
			return nil
		}
		if !sleep(ctx, 200*time.Millisecond) {
			return fmt.Errorf("not shut off yet (%w); it keeps running: shut it down yourself (virsh shutdown), then run this again", context.Cause(ctx))
		}
	}
}

// sysprep resets a shut-off domain's machine identity with virt-sysprep (libguestfs),
// which opens its disks on this host.
func sysprep(ctx context.Context, uri, name string) error {
	bin, err := exec.LookPath("virt-sysprep")
	if err != nil {
		return fmt.Errorf("%s is shut off: start it (its guest agent then resets its identity), or install virt-sysprep (libguestfs-tools)", name)
	}
	out, err := exec.CommandContext(ctx, bin, "-c", uri, "-d", name,
		"--operations", "machine-id,ssh-hostkeys,logfiles,dhcp-client-state,dhcp-server-state,tmp-files").CombinedOutput()
	if err != nil {
		return fmt.Errorf("virt-sysprep %s: %v: %s", name, err, out)
	}
	return nil
}
