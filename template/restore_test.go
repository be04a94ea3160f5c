package template

import (
	"fmt"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"libvirt.org/go/libvirtxml"
)

// A warm image's XML (rendered Warm, as libvirt keeps it: MAC addresses filled in)
// becomes a clone's: its own name, UUID, metadata, overlays and MAC addresses, every
// NIC's link down, and nothing else changed.
func TestRestored(t *testing.T) {
	tmpl := readTemplate(t, "devices")
	inst := Instance{Name: "warm", Overlays: map[string]Overlay{}, Warm: true, QEMUArgs: []string{"-device", "virtio-net-pci,netdev=gcissh,addr=0x9,mac=52:54:00:AA:BB:CC"}}
	for _, d := range tmpl.Disks {
		inst.Overlays[d.Target] = Overlay{Pool: "p", Volume: "warm-" + d.Target + ".qcow2"}
	}
	warm, err := tmpl.Render(inst)
	require.NoError(t, err)
	assert.Contains(t, warm, "<genid></genid>")
	var wd libvirtxml.Domain
	require.NoError(t, wd.Unmarshal(warm))
	for i := range wd.Devices.Interfaces {
		require.NotNil(t, wd.Devices.Interfaces[i].Link)
		assert.Equal(t, "down", wd.Devices.Interfaces[i].Link.State, "a warm image's NICs are never up")
		wd.Devices.Interfaces[i].MAC = &libvirtxml.DomainInterfaceMAC{Address: fmt.Sprintf("52:54:00:00:00:%02X", i)}
	}
	warm, err = wd.Marshal()
	require.NoError(t, err)

	n := 0
	newMAC := func() string { n++; return fmt.Sprintf("52:54:00:11:11:%02x", n) }
	clone := Clone{Name: "job-1", UUID: "6f1c7a7e-0d4b-4c1e-9a53-3b1f5a0d2c11", Metadata: `<gci:x xmlns:gci="urn:x">1</gci:x>`, Overlays: map[string]Overlay{}}
	for _, d := range tmpl.Disks {
		clone.Overlays[d.Target] = Overlay{Pool: "p", Volume: "job-1-" + d.Target + ".qcow2"}
	}
	x, macs, err := Restored(warm, clone, newMAC)
	require.NoError(t, err)
	var cd libvirtxml.Domain
	require.NoError(t, cd.Unmarshal(x))
	assert.Equal(t, "job-1", cd.Name)
	assert.Equal(t, clone.UUID, cd.UUID)
	assert.Contains(t, x, `<gci:x xmlns:gci="urn:x">1</gci:x>`)
	assert.NotContains(t, x, "warm-", "no disk of the clone is the warm image's own")
	for _, d := range cd.Devices.Disks {
		if ov, ok := clone.Overlays[d.Target.Dev]; ok {
			assert.Equal(t, ov.Volume, d.Source.Volume.Volume)
			assert.Nil(t, d.BackingStore, "the overlay names its backing file")
		}
	}
	require.Len(t, macs, len(wd.Devices.Interfaces)+1, "each NIC, and the one of the QEMU arguments")
	for i, iface := range cd.Devices.Interfaces {
		assert.Equal(t, MACChange{Old: fmt.Sprintf("52:54:00:00:00:%02x", i), New: fmt.Sprintf("52:54:00:11:11:%02x", i+1), Link: true}, macs[i])
		assert.Equal(t, macs[i].New, iface.MAC.Address)
		assert.Equal(t, "down", iface.Link.State, "up only once the guest has its new address")
	}
	last := macs[len(macs)-1]
	assert.Equal(t, "52:54:00:aa:bb:cc", last.Old)
	assert.False(t, last.Link)
	assert.Contains(t, x, "mac="+last.New)
	// Nothing else: the devices are the ones whose state QEMU restores.
	assert.Equal(t, len(wd.Devices.Disks), len(cd.Devices.Disks))
	assert.Equal(t, len(wd.Devices.Controllers), len(cd.Devices.Controllers))
	assert.Equal(t, wd.Memory, cd.Memory)

	up, err := LinkUp(x, macs[0].New)
	require.NoError(t, err)
	assert.Contains(t, up, `<link state="up"></link>`)
	assert.Contains(t, up, macs[0].New)
	_, err = LinkUp(x, "52:54:00:99:99:99")
	assert.Error(t, err)

	_, _, err = Restored(warm, Clone{Name: "job-2", UUID: clone.UUID, Overlays: map[string]Overlay{"vdz": {Pool: "p", Volume: "v"}}}, newMAC)
	assert.ErrorContains(t, err, `the warm image has no disk "vdz"`)
	_, _, err = Restored(strings.Replace(warm, "<mac address", "<mac-gone address", 1), clone, newMAC)
	assert.Error(t, err)
}

func TestNewIDs(t *testing.T) {
	assert.Regexp(t, `^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`, NewUUID())
	assert.Regexp(t, `^52:54:00(:[0-9a-f]{2}){3}$`, NewMAC())
	assert.NotEqual(t, NewUUID(), NewUUID())
}
