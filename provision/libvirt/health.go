package libvirt

import (
	"fmt"
	"io/fs"
	"os"
	"time"

	"github.com/libvirt-gci/libvirt-gci/provision/libvirt/dial"
)

// SlowCall is how long a libvirt call that normally takes milliseconds (a lookup, a
// define) may take before it is worth a warning that says why.
const SlowCall = 2 * time.Second

// kvmDevice is where libvirt looks for KVM.
const kvmDevice = "/dev/kvm"

// SlowHint says why libvirt at uri answers slowly, as far as this host can tell. The
// usual cause is libvirtd probing QEMU's capabilities again on every call (seconds
// each, one at a time): its cache of them is invalid whenever KVM's usability differs
// from what the last probe saw, as when /dev/kvm lacks the kvm group that udev gives it.
func SlowHint(uri string) string {
	const generic = "libvirtd is probably probing QEMU again on every call (its log says why, with log filter 1:qemu.qemu_capabilities) or is overloaded; see \"Slow libvirt\" in README.rst"
	if !dial.IsLocal(uri) {
		return generic // a remote libvirtd: its host's /dev/kvm is not ours to see
	}
	fi, err := os.Stat(kvmDevice)
	if err != nil {
		return generic
	}
	return kvmHint(fi.Mode(), kvmDevice, generic)
}

func kvmHint(mode fs.FileMode, dev, generic string) string {
	if h := kvmModeHint(mode, dev); h != "" {
		return h
	}
	return generic
}

// KVMModeHint says what to do when /dev/kvm, of mode, keeps QEMU from using KVM and so
// makes libvirtd probe QEMU again on every call; "" when its mode is fine.
func KVMModeHint(mode fs.FileMode) string { return kvmModeHint(mode, kvmDevice) }

func kvmModeHint(mode fs.FileMode, dev string) string {
	if mode&fs.ModeCharDevice == 0 || mode.Perm()&0o060 == 0o060 || mode.Perm()&0o006 == 0o006 {
		return ""
	}
	return fmt.Sprintf("%s is mode %s, so QEMU (run as another user) cannot use KVM and libvirtd probes QEMU again on every call; "+
		"give it the mode udev would (chgrp kvm %s && chmod 0660 %s); see \"Slow libvirt\" in README.rst", dev, mode.Perm(), dev, dev)
}
