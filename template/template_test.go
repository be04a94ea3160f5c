package template

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"libvirt.org/go/libvirtxml"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/template")

const goldenDir = "../testdata/template"

func readTemplate(t *testing.T, name string) *Template {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(goldenDir, name+".template.xml"))
	require.NoError(t, err)
	tmpl, err := Parse(string(b))
	require.NoError(t, err)
	return tmpl
}

func TestParseFindsWritableDisksAndAgent(t *testing.T) {
	t.Parallel()
	tmpl := readTemplate(t, "full")
	assert.Equal(t, "debian-12", tmpl.Name)
	assert.True(t, tmpl.HasAgent)
	assert.Equal(t, []Disk{
		{Target: "vda", Path: "/var/lib/libvirt/images/debian-12.qcow2", Format: "qcow2"},
		{Target: "vdb", Path: "/var/lib/libvirt/images/debian-12-data.img", Format: "raw"}, // no driver type: raw
	}, tmpl.Disks, "read-only, shareable and CD-ROM disks are not cloned")

	bare := readTemplate(t, "noagent")
	assert.False(t, bare.HasAgent)
}

func TestRenderGolden(t *testing.T) {
	t.Parallel()
	tmpl := readTemplate(t, "full")
	const meta = `<gci:instance xmlns:gci="https://example.invalid/ns"><template>debian-12</template></gci:instance>`
	got, err := tmpl.Render(Instance{
		Name: "gci-abc-42-proj",
		Overlays: map[string]Overlay{
			"vda": {Pool: "ci", Volume: "gci-abc-42-proj-vda.qcow2"},
			"vdb": {Pool: "ci", Volume: "gci-abc-42-proj-vdb.qcow2"},
		},
		Metadata: meta,
	})
	require.NoError(t, err)

	golden := filepath.Join(goldenDir, "full.instance.xml")
	if *update {
		require.NoError(t, os.WriteFile(golden, []byte(got+"\n"), 0o644))
	}
	want, err := os.ReadFile(golden)
	require.NoError(t, err)
	assert.Equal(t, strings.TrimSpace(string(want)), got)

	// The properties the golden file stands for, checked on the parsed result.
	var dom libvirtxml.Domain
	require.NoError(t, dom.Unmarshal(got))
	assert.Equal(t, "gci-abc-42-proj", dom.Name)
	assert.Empty(t, dom.UUID, "libvirt must generate a fresh UUID")
	assert.Nil(t, dom.Devices.Interfaces[0].MAC, "libvirt must generate a fresh MAC")
	assert.Equal(t, "default", dom.Devices.Interfaces[0].Source.Network.Network)
	assert.Empty(t, dom.OS.NVRam.NVRam, "the template's NVRAM file must not be shared")
	assert.Equal(t, "/usr/share/OVMF/OVMF_VARS_4M.fd", dom.OS.NVRam.Template)
	assert.Equal(t, meta, dom.Metadata.XML, "the template's metadata (its template mark, say) is not the instance's")

	disks := dom.Devices.Disks
	require.Len(t, disks, 5)
	for i, want := range []string{"gci-abc-42-proj-vda.qcow2", "gci-abc-42-proj-vdb.qcow2"} {
		require.NotNil(t, disks[i].Source.Volume, "disk %d", i)
		assert.Equal(t, Overlay{"ci", want}, Overlay{disks[i].Source.Volume.Pool, disks[i].Source.Volume.Volume})
		assert.Equal(t, "qcow2", disks[i].Driver.Type)
		assert.Equal(t, "enospace", disks[i].Driver.ErrorPolicy, "a full pool pauses the VM, which its stage sees")
		assert.Equal(t, "report", disks[i].Driver.RErrorPolicy, "a failed read is the guest's to see")
		assert.Nil(t, disks[i].BackingStore)
	}
	assert.Equal(t, "unsafe", disks[0].Driver.Cache, "driver tuning is kept")
	assert.Equal(t, "/srv/ci/tools.img", disks[2].Source.File.File, "read-only disk kept")
	assert.Equal(t, "/dev/vg0/ci-cache", disks[3].Source.Block.Dev, "read-only shareable disk kept")
	assert.Equal(t, "/srv/ci/seed.iso", disks[4].Source.File.File, "CD-ROM kept")

	// The template itself is untouched by rendering.
	assert.Equal(t, "2f3c8a51-7f40-4bd3-a3bb-0b3f0e4b9d11", tmpl.dom.UUID)
	assert.Equal(t, "/var/lib/libvirt/images/debian-12.qcow2", tmpl.dom.Devices.Disks[0].Source.File.File)
}

// Every instance gets its own display ports and sockets, ptys instead of the template's
// files, sockets and ports, its own vsock CID, and ports isolated from the other clones.
func TestRenderIsolatesDevicesGolden(t *testing.T) {
	t.Parallel()
	tmpl := readTemplate(t, "devices")
	assert.Equal(t, []string{"an <interface type='user'> (QEMU's user network reaches the host's 127.0.0.1 as its gateway; use a libvirt network)"}, tmpl.HostAccess(),
		"a user NIC reaches the host's loopback (issue 24): rendered when the operator allows it")
	got, err := tmpl.Render(Instance{Name: "gci-1-x", Overlays: map[string]Overlay{"vda": {Pool: "ci", Volume: "gci-1-x-vda.qcow2"}}})
	require.NoError(t, err)
	golden := filepath.Join(goldenDir, "devices.instance.xml")
	if *update {
		require.NoError(t, os.WriteFile(golden, []byte(got+"\n"), 0o644))
	}
	want, err := os.ReadFile(golden)
	require.NoError(t, err)
	assert.Equal(t, strings.TrimSpace(string(want)), got)

	// What the golden file stands for: nothing of the template's that two running
	// clones could both claim.
	for _, fixed := range []string{"/var/log/ci/", "/run/ci/", "devices.org.qemu", "5901", "5701", "5930", "5931", "4555", "0.0.0.0", "address=\"42\"", "vnet-tmpl", "52:54:00"} {
		assert.NotContains(t, got, fixed)
	}
	var dom libvirtxml.Domain
	require.NoError(t, dom.Unmarshal(got))
	d := dom.Devices
	assert.Equal(t, "yes", d.Interfaces[0].PortOptions.Isolated, "network")
	assert.Equal(t, "yes", d.Interfaces[1].PortOptions.Isolated, "bridge")
	assert.Nil(t, d.Interfaces[2].PortOptions, "user networking has no bridge port")
	assert.Equal(t, "yes", d.Graphics[0].VNC.AutoPort)
	assert.Equal(t, -1, d.Graphics[0].VNC.WebSocket)
	assert.Equal(t, "127.0.0.1", d.Graphics[0].VNC.Listeners[0].Address.Address, "listen addresses are kept")
	assert.NotNil(t, d.Graphics[1].VNC.Listeners[0].Socket, "a socket of libvirt's naming")
	assert.Equal(t, "yes", d.Graphics[2].Spice.AutoPort)
	for _, s := range d.Serials {
		assert.NotNil(t, s.Source.Pty)
		assert.Nil(t, s.Log)
	}
	assert.NotNil(t, d.Consoles[0].Source.Pty)
	assert.Equal(t, "org.qemu.guest_agent.0", d.Channels[0].Target.VirtIO.Name)
	assert.Empty(t, d.Channels[0].Source.UNIX.Path)
	assert.Equal(t, "yes", d.VSock.CID.Auto)
}

// No instance's memory is merged with another's by KSM (issue 24): clones of one
// template, of any project, would share pages, a side channel between jobs. With a
// cache share too (virtiofs wants the memory shared with its daemon, not merged).
func TestRenderNoSharePages(t *testing.T) {
	t.Parallel()
	for _, shares := range [][]Share{nil, {{Source: "/c", Tag: "gci-cache"}}} {
		got, err := readTemplate(t, "full").Render(Instance{Name: "gci-1-x", Shares: shares,
			Overlays: map[string]Overlay{"vda": {Pool: "ci", Volume: "a.qcow2"}, "vdb": {Pool: "ci", Volume: "b.qcow2"}}})
		require.NoError(t, err)
		var dom libvirtxml.Domain
		require.NoError(t, dom.Unmarshal(got))
		require.NotNil(t, dom.MemoryBacking)
		assert.NotNil(t, dom.MemoryBacking.MemoryNosharepages, got)
	}
}

// An x86 instance gets a pvpanic device where its template has none (a guest kernel's
// panic then ends the VM, and its stage, at once); a template's own is kept, and other
// architectures get none.
func TestRenderAddsPanic(t *testing.T) {
	t.Parallel()
	render := func(edit func(*libvirtxml.Domain)) []string {
		tmpl := readTemplate(t, "full")
		edit(&tmpl.dom)
		got, err := tmpl.Render(Instance{Name: "gci-1-x", Overlays: map[string]Overlay{"vda": {Pool: "ci", Volume: "a.qcow2"}, "vdb": {Pool: "ci", Volume: "b.qcow2"}}})
		require.NoError(t, err)
		var dom libvirtxml.Domain
		require.NoError(t, dom.Unmarshal(got))
		var models []string
		for _, p := range dom.Devices.Panics {
			models = append(models, p.Model)
		}
		return models
	}
	assert.Equal(t, []string{"isa"}, render(func(*libvirtxml.Domain) {}))
	assert.Equal(t, []string{"hyperv"}, render(func(d *libvirtxml.Domain) {
		d.Devices.Panics = []libvirtxml.DomainPanic{{Model: "hyperv"}}
	}))
	assert.Empty(t, render(func(d *libvirtxml.Domain) { d.OS.Type.Arch = "aarch64" }))
}

// Devices that reach the host's hardware or files, or other guests, are named, so that
// prepare can refuse the template.
func TestHostAccess(t *testing.T) {
	t.Parallel()
	assert.Empty(t, readTemplate(t, "full").HostAccess())
	assert.Equal(t, []string{
		"a <qemu:commandline> (QEMU arguments of its own: anything the QEMU process reaches)",
		"a <hostdev> (PCI)",
		"a <filesystem> (a host directory or image shared in)",
		"a writable <shareable/> disk (vdb)",
		"a <disk device='lun'> (sdb: SCSI commands to a host device)",
		"a <tpm> backed by the host's TPM or an outside emulator",
		"a <shmem> (memory shared with other domains)",
		`an <input type="passthrough"> (a host input device)`,
		"an <interface> on host network plumbing (only network and bridge interfaces are isolated)",
		"a <channel> to a host file, device or port",
	}, readTemplate(t, "hostaccess").HostAccess())
}

// A writable floppy is a disk like any other (issue 36): every clone gets an overlay of
// its own for it, not the template's image to write, which every job would share.
func TestWritableFloppyGetsAnOverlay(t *testing.T) {
	t.Parallel()
	tmpl, err := Parse(`<domain type='qemu'><name>t</name><devices>` +
		`<disk type='file' device='disk'><source file='/a.qcow2'/><driver name='qemu' type='qcow2'/><target dev='vda'/></disk>` +
		`<disk type='file' device='floppy'><source file='/shared.img'/><target dev='fda'/></disk>` +
		`<disk type='file' device='floppy'><source file='/ro.img'/><target dev='fdb'/><readonly/></disk>` +
		`</devices></domain>`)
	require.NoError(t, err)
	assert.Equal(t, []Disk{{Target: "vda", Path: "/a.qcow2", Format: "qcow2"}, {Target: "fda", Path: "/shared.img", Format: "raw"}}, tmpl.Disks)
	out, err := tmpl.Render(Instance{Name: "x", Overlays: map[string]Overlay{"vda": {"p", "a"}, "fda": {"p", "f"}}})
	require.NoError(t, err)
	assert.NotContains(t, out, "/shared.img", "the template's floppy image is no clone's")
	assert.Contains(t, out, "/ro.img", "a read-only one is passed through")
	assert.Empty(t, tmpl.HostAccess())
}

func TestParseRejects(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ name, disk, want string }{
		{"network disk", `<disk type='network' device='disk'><source protocol='rbd' name='pool/img'/><target dev='vda'/></disk>`,
			`disk "vda" is not a file-backed disk`},
		{"block disk", `<disk type='block' device='disk'><source dev='/dev/sdz'/><target dev='vda'/></disk>`,
			`disk "vda" is not a file-backed disk`},
		{"vmdk", `<disk type='file' device='disk'><driver name='qemu' type='vmdk'/><source file='/a.vmdk'/><target dev='vda'/></disk>`,
			`disk "vda" has format "vmdk"`},
		{"no target", `<disk type='file' device='disk'><source file='/a.img'/></disk>`, "has no target device"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse(`<domain type='qemu'><name>t</name><devices>` + tc.disk + `</devices></domain>`)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.want)
		})
	}
	_, err := Parse("<domain><name>broken")
	assert.ErrorContains(t, err, "parse template XML")
}

func TestRenderNeedsExactlyTheWritableDisks(t *testing.T) {
	t.Parallel()
	tmpl := readTemplate(t, "noagent")
	_, err := tmpl.Render(Instance{Name: "x"})
	assert.ErrorContains(t, err, `no overlay volume for disk "vda"`)
	_, err = tmpl.Render(Instance{Name: "x", Overlays: map[string]Overlay{"vda": {"p", "v"}, "vdz": {"p", "w"}}})
	assert.ErrorContains(t, err, `overlay for "vdz", which is not a writable disk`)
	_, err = tmpl.Render(Instance{Overlays: map[string]Overlay{"vda": {"p", "v"}}})
	assert.ErrorContains(t, err, "empty name")
	out, err := tmpl.Render(Instance{Name: "x", Overlays: map[string]Overlay{"vda": {"p", "v"}}})
	require.NoError(t, err)
	assert.NotContains(t, out, "<metadata", "no metadata element without metadata")
}

// Extra QEMU arguments (the ssh transport's user-mode network) follow the template's own.
func TestRenderQEMUArgs(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, extra string
		want        []string
	}{
		{"none in the template", "", []string{"-netdev", "user,id=n"}},
		{"kept from the template", `<qemu:commandline xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0"><qemu:arg value="-no-hpet"/></qemu:commandline>`,
			[]string{"-no-hpet", "-netdev", "user,id=n"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			x := `<domain type="qemu"><name>t</name><memory>1</memory>` + tc.extra + `</domain>`
			tmpl, err := Parse(x)
			require.NoError(t, err)
			got, err := tmpl.Render(Instance{Name: "i", QEMUArgs: []string{"-netdev", "user,id=n"}})
			require.NoError(t, err)
			var dom libvirtxml.Domain
			require.NoError(t, dom.Unmarshal(got))
			require.NotNil(t, dom.QEMUCommandline)
			var args []string
			for _, a := range dom.QEMUCommandline.Args {
				args = append(args, a.Value)
			}
			assert.Equal(t, tc.want, args)
		})
	}
}

func TestFreePCISlot(t *testing.T) {
	t.Parallel()
	slot, err := readTemplate(t, "full").FreePCISlot()
	require.NoError(t, err)
	assert.Equal(t, 31, slot)

	var b strings.Builder
	b.WriteString(`<domain type="qemu"><name>t</name><memory>1</memory><devices>`)
	for s := 31; s >= 5; s-- { // 0x1f..0x05 taken on bus 0; 0x04 free; bus 1 does not count
		fmt.Fprintf(&b, `<controller type="pci" index="%d" model="pci-bridge"><address type="pci" domain="0x0000" bus="0x00" slot="0x%02x" function="0x0"/></controller>`, 40-s, s)
	}
	b.WriteString(`<memballoon model="virtio"><address type="pci" domain="0x0000" bus="0x01" slot="0x04" function="0x0"/></memballoon>`)
	b.WriteString(`</devices></domain>`)
	tmpl, err := Parse(b.String())
	require.NoError(t, err)
	slot, err = tmpl.FreePCISlot()
	require.NoError(t, err)
	assert.Equal(t, 4, slot)
}

func TestRenderResizes(t *testing.T) {
	t.Parallel()
	tmpl := readTemplate(t, "full")
	assert.Equal(t, 2, tmpl.CPUs())
	assert.Equal(t, uint64(2097152), tmpl.MemoryKiB())
	got, err := tmpl.Render(Instance{Name: "x", CPUs: 4, MemoryKiB: 8 << 20, Overlays: map[string]Overlay{
		"vda": {Pool: "ci", Volume: "a"}, "vdb": {Pool: "ci", Volume: "b"}}})
	require.NoError(t, err)
	var dom libvirtxml.Domain
	require.NoError(t, dom.Unmarshal(got))
	assert.Equal(t, uint(4), dom.VCPU.Value)
	assert.Equal(t, uint(8<<20), dom.Memory.Value)
	assert.Equal(t, "KiB", dom.Memory.Unit)
	assert.Equal(t, uint(8<<20), dom.CurrentMemory.Value)
	assert.Equal(t, uint64(1<<20), KiB(1, "GiB"))
	assert.Equal(t, uint64(1000), KiB(1024000, "b"))
	assert.Equal(t, uint64(976562), KiB(1000, "MB"))
}

// Read-only disks go on virtio targets the template leaves free, raw and read-only,
// with their serial.
func TestRenderReadOnlyDisks(t *testing.T) {
	t.Parallel()
	x := `<domain type="qemu"><name>t</name><memory>1</memory><devices>
<disk type="file" device="disk"><driver name="qemu" type="qcow2"/><source file="/i/a.qcow2"/><target dev="vda" bus="virtio"/></disk>
<disk type="file" device="disk"><driver name="qemu" type="raw"/><source file="/i/b.img"/><target dev="vdb" bus="virtio"/><readonly/></disk>
</devices></domain>`
	tmpl, err := Parse(x)
	require.NoError(t, err)
	got, err := tmpl.Render(Instance{Name: "i", Overlays: map[string]Overlay{"vda": {Pool: "p", Volume: "o"}},
		ReadOnly: []ReadOnlyDisk{{Pool: "p", Volume: "h1.img", Serial: "one"}, {Pool: "p", Volume: "h2.img", Serial: "two"}}})
	require.NoError(t, err)
	var dom libvirtxml.Domain
	require.NoError(t, dom.Unmarshal(got))
	require.Len(t, dom.Devices.Disks, 4)
	for i, want := range []struct{ dev, vol, serial string }{{"vdc", "h1.img", "one"}, {"vdd", "h2.img", "two"}} {
		d := dom.Devices.Disks[2+i]
		assert.Equal(t, want.dev, d.Target.Dev)
		assert.Equal(t, "virtio", d.Target.Bus)
		assert.Equal(t, want.vol, d.Source.Volume.Volume)
		assert.Equal(t, "raw", d.Driver.Type)
		assert.NotNil(t, d.ReadOnly)
		assert.Equal(t, want.serial, d.Serial)
	}
	assert.Contains(t, got, `<disk type="volume" device="disk">`)
}
