package template

import "libvirt.org/go/libvirtxml"

// Base is a base image's built-in definition: the Python libvirt-gci's DISTRO.qcow2,
// with DISTRO.vmlinuz and DISTRO.initrd beside it where it has no bootloader.
type Base struct {
	Name, Disk              string // the domain's name; the image's path on the libvirt host
	Kernel, Initrd, Cmdline string // direct kernel boot; "" to boot the disk
	Virt                    string // the domain type: kvm or qemu
	MemKiB                  uint64
	CPUs                    int
	Network                 string // the NIC's libvirt network; "" for none
}

// BaseXML is b's domain: q35, a virtio disk and NIC, the agent channel, a virtio RNG, a
// serial console.
func BaseXML(b Base) (string, error) {
	dom := libvirtxml.Domain{
		Type:        b.Virt,
		Name:        b.Name,
		Description: "libvirt-gci base image " + b.Disk,
		Memory:      &libvirtxml.DomainMemory{Value: uint(b.MemKiB), Unit: "KiB"},
		VCPU:        &libvirtxml.DomainVCPU{Value: uint(b.CPUs)},
		OS: &libvirtxml.DomainOS{
			Type:    &libvirtxml.DomainOSType{Arch: "x86_64", Machine: "q35", Type: "hvm"},
			Kernel:  b.Kernel,
			Initrd:  b.Initrd,
			Cmdline: b.Cmdline,
		},
		Features:   &libvirtxml.DomainFeatureList{ACPI: &libvirtxml.DomainFeature{}, APIC: &libvirtxml.DomainFeatureAPIC{}},
		OnPoweroff: "destroy",
		OnReboot:   "restart",
		OnCrash:    "destroy",
		Devices: &libvirtxml.DomainDeviceList{
			Disks: []libvirtxml.DomainDisk{{
				Device: "disk",
				Driver: &libvirtxml.DomainDiskDriver{Name: "qemu", Type: "qcow2"},
				Source: &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: b.Disk}},
				Target: &libvirtxml.DomainDiskTarget{Dev: "vda", Bus: "virtio"},
			}},
			Channels: []libvirtxml.DomainChannel{{
				Source: &libvirtxml.DomainChardevSource{UNIX: &libvirtxml.DomainChardevSourceUNIX{}},
				Target: &libvirtxml.DomainChannelTarget{VirtIO: &libvirtxml.DomainChannelTargetVirtIO{Name: AgentChannel}},
			}},
			Serials:     []libvirtxml.DomainSerial{{Source: &libvirtxml.DomainChardevSource{Pty: &libvirtxml.DomainChardevSourcePty{}}}},
			RNGs:        []libvirtxml.DomainRNG{{Model: "virtio", Backend: &libvirtxml.DomainRNGBackend{Random: &libvirtxml.DomainRNGBackendRandom{Device: "/dev/urandom"}}}},
			MemBalloon:  &libvirtxml.DomainMemBalloon{Model: "none"},
			Controllers: []libvirtxml.DomainController{{Type: "usb", Model: "none"}},
		},
	}
	if b.Kernel == "" {
		dom.OS.BootDevices = []libvirtxml.DomainBootDevice{{Dev: "hd"}}
	}
	if b.Virt == "kvm" {
		dom.CPU = &libvirtxml.DomainCPU{Mode: "host-passthrough"}
	}
	if b.Network != "" {
		dom.Devices.Interfaces = []libvirtxml.DomainInterface{{
			Source: &libvirtxml.DomainInterfaceSource{Network: &libvirtxml.DomainInterfaceSourceNetwork{Network: b.Network}},
			Model:  &libvirtxml.DomainInterfaceModel{Type: "virtio"},
		}}
	}
	return dom.Marshal()
}
