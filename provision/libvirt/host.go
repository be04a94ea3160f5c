package libvirt

import (
	"cmp"
	"fmt"

	"libvirt.org/go/libvirtxml"
)

// NodeInfo is the libvirt host's memory (KiB) and CPUs.
func (c *Conn) NodeInfo() (memKiB uint64, cpus int, err error) {
	_, memKiB, n, _, _, _, _, _, err := c.api.NodeGetInfo()
	if err != nil {
		return 0, 0, fmt.Errorf("host info: %w", err)
	}
	return memKiB, int(n), nil
}

// FreeMemory is the libvirt host's free memory in bytes; known is false where this
// connection cannot tell.
func (c *Conn) FreeMemory() (bytes uint64, known bool, err error) {
	n, ok := c.api.(interface{ NodeGetFreeMemory() (uint64, error) })
	if !ok {
		return 0, false, nil
	}
	if bytes, err = n.NodeGetFreeMemory(); err != nil {
		return 0, true, fmt.Errorf("free memory: %w", err)
	}
	return bytes, true, nil
}

// DefineAndUndefine defines the domain x, then undefines it: a probe of libvirtd's speed.
func (c *Conn) DefineAndUndefine(x string) error {
	dom, err := c.api.DomainDefineXMLFlags(x, 0)
	if err != nil {
		return fmt.Errorf("define: %w", err)
	}
	if err := c.api.DomainUndefineFlags(dom, 0); err != nil {
		return fmt.Errorf("undefine %s (remove it: virsh undefine %s): %w", dom.Name, dom.Name, err)
	}
	return nil
}

// KVMEmulator is the QEMU binary libvirt runs x86_64 KVM guests with, from its
// capabilities; "" where libvirt offers no KVM.
func (c *Conn) KVMEmulator() (string, error) {
	caps, err := c.api.ConnectGetCapabilities()
	if err != nil {
		return "", fmt.Errorf("capabilities: %w", err)
	}
	return kvmEmulator(caps), nil
}

func kvmEmulator(caps string) string {
	var c libvirtxml.Caps
	if c.Unmarshal(caps) != nil {
		return ""
	}
	for _, g := range c.Guests {
		if g.Arch.Name != "x86_64" {
			continue
		}
		for _, d := range g.Arch.Domains {
			if d.Type == "kvm" {
				return cmp.Or(d.Emulator, g.Arch.Emulator)
			}
		}
	}
	return ""
}
