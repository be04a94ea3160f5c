package libvirt

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/libvirt-gci/libvirt-gci/provision/meta"
	"github.com/libvirt-gci/libvirt-gci/provision/provisiontest"

	"github.com/digitalocean/go-libvirt"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"libvirt.org/go/libvirtxml"
)

const inst = "gci-r-1"

func instanceSpec(t *testing.T, pool string) Spec {
	t.Helper()
	vols := []NewVolume{
		{Volume: meta.Volume{Pool: pool, Name: inst + "-vda.qcow2"}, BackingPath: "/t/root.qcow2", BackingFormat: "qcow2"},
		{Volume: meta.Volume{Pool: pool, Name: inst + "-vdb.qcow2"}, BackingPath: "/t/data.img", BackingFormat: "raw"},
	}
	md, err := meta.Metadata{Template: "t", Owner: meta.Owner{JobID: "1", ProjectID: "2"}, PrepareID: "p1", CreatedAt: "2026-11-22T10:00:00Z",
		Volumes: []meta.Volume{vols[0].Volume, vols[1].Volume}}.MarshalElement()
	require.NoError(t, err)
	dom := libvirtxml.Domain{Type: "qemu", Name: inst, Metadata: &libvirtxml.DomainMetadata{XML: md},
		Devices: &libvirtxml.DomainDeviceList{}}
	for _, v := range vols {
		dom.Devices.Disks = append(dom.Devices.Disks, libvirtxml.DomainDisk{
			Device: "disk",
			Source: &libvirtxml.DomainDiskSource{Volume: &libvirtxml.DomainDiskSourceVolume{Pool: v.Pool, Volume: v.Name}},
		})
	}
	x, err := dom.Marshal()
	require.NoError(t, err)
	return Spec{Name: inst, DomainXML: x, Volumes: vols}
}

func TestCreateThenTeardown(t *testing.T) {
	t.Parallel()
	f := provisiontest.New("ci")
	c := &Conn{api: f}
	_, err := c.Create(context.Background(), instanceSpec(t, "ci"))
	require.NoError(t, err)
	assert.Equal(t, "domain gci-r-1 running=true; volume ci/gci-r-1-vda.qcow2; volume ci/gci-r-1-vdb.qcow2", f.State())

	// The overlays state their backing format (else libvirt writes raw).
	var v libvirtxml.StorageVolume
	require.NoError(t, v.Unmarshal(f.VolumeXML("ci", inst+"-vdb.qcow2")))
	assert.Equal(t, "qcow2", v.Target.Format.Type)
	assert.Equal(t, "/t/data.img", v.BackingStore.Path)
	assert.Equal(t, "raw", v.BackingStore.Format.Type)
	assert.Nil(t, v.Capacity, "an overlay takes its backing file's size")

	r, err := c.Teardown(t.Context(), inst, nil)
	require.NoError(t, err)
	assert.Equal(t, Removed{Domain: true, Destroyed: true, Volumes: []string{inst + "-vda.qcow2", inst + "-vdb.qcow2"}}, r)
	assert.Empty(t, f.State())
}

// Create fails at each step; the metadata written first lets Teardown remove everything.
func TestCreateFailuresLeaveARecord(t *testing.T) {
	t.Parallel()
	for _, step := range []string{"DomainDefineXMLFlags", "StorageVolCreateXML", "DomainCreate"} {
		t.Run(step, func(t *testing.T) {
			f := provisiontest.New("ci")
			f.Fail(step, libvirt.Error{Code: uint32(libvirt.ErrInternalError), Message: "injected"})
			c := &Conn{api: f}
			_, err := c.Create(context.Background(), instanceSpec(t, "ci"))
			require.ErrorContains(t, err, "injected")
			f.Fail(step, nil)
			_, err = c.Teardown(t.Context(), inst, nil)
			require.NoError(t, err)
			assert.Empty(t, f.State())
		})
	}
	f := provisiontest.New("ci")
	_, err := (&Conn{api: f}).Create(context.Background(), instanceSpec(t, "missing"))
	assert.ErrorContains(t, err, `storage pool "missing"`)
	assert.Empty(t, f.State(), "nothing is defined when the pool is missing")
}

// Teardown over every partial state an instance can be left in.
func TestTeardownPartialStates(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T, f *provisiontest.Libvirt, c *Conn)
		want  Removed
	}{
		{"nothing created", func(*testing.T, *provisiontest.Libvirt, *Conn) {}, Removed{}},
		{"defined, no volumes yet", func(t *testing.T, f *provisiontest.Libvirt, c *Conn) {
			_, err := f.DomainDefineXMLFlags(instanceSpec(t, "ci").DomainXML, 0)
			require.NoError(t, err)
		}, Removed{Domain: true}},
		{"defined, one volume", func(t *testing.T, f *provisiontest.Libvirt, c *Conn) {
			s := instanceSpec(t, "ci")
			_, err := f.DomainDefineXMLFlags(s.DomainXML, 0)
			require.NoError(t, err)
			x, _ := overlayXML(s.Volumes[0])
			_, err = f.StorageVolCreateXML(libvirt.StoragePool{Name: "ci"}, x, 0)
			require.NoError(t, err)
		}, Removed{Domain: true, Volumes: []string{inst + "-vda.qcow2"}}},
		{"defined, not started", func(t *testing.T, f *provisiontest.Libvirt, c *Conn) {
			f.Fail("DomainCreate", errors.New("no start"))
			_, _ = c.Create(context.Background(), instanceSpec(t, "ci"))
			f.Fail("DomainCreate", nil)
		}, Removed{Domain: true, Volumes: []string{inst + "-vda.qcow2", inst + "-vdb.qcow2"}}},
		{"running", func(t *testing.T, f *provisiontest.Libvirt, c *Conn) {
			_, err := c.Create(context.Background(), instanceSpec(t, "ci"))
			require.NoError(t, err)
		}, Removed{Domain: true, Destroyed: true, Volumes: []string{inst + "-vda.qcow2", inst + "-vdb.qcow2"}}},
		{"volumes deleted behind our back", func(t *testing.T, f *provisiontest.Libvirt, c *Conn) {
			_, err := c.Create(context.Background(), instanceSpec(t, "ci"))
			require.NoError(t, err)
			f.DeleteVolumes("ci")
		}, Removed{Domain: true, Destroyed: true}},
		{"pool gone", func(t *testing.T, f *provisiontest.Libvirt, c *Conn) {
			_, err := c.Create(context.Background(), instanceSpec(t, "ci"))
			require.NoError(t, err)
			f.RemovePool("ci")
		}, Removed{Domain: true, Destroyed: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := provisiontest.New("ci")
			c := &Conn{api: f}
			tc.setup(t, f, c)
			r, err := c.Teardown(t.Context(), inst, nil)
			require.NoError(t, err)
			assert.Equal(t, tc.want, r)
			assert.Empty(t, f.State())
			// And again: already gone.
			r, err = c.Teardown(t.Context(), inst, nil)
			require.NoError(t, err)
			assert.Equal(t, Removed{}, r)
		})
	}
}

func TestTeardownRefusesUnmanagedDomains(t *testing.T) {
	t.Parallel()
	f := provisiontest.New("ci")
	c := &Conn{api: f}
	_, err := f.DomainDefineXMLFlags(`<domain type='qemu'><name>`+inst+`</name></domain>`, 0)
	require.NoError(t, err)
	require.NoError(t, f.DomainCreate(libvirt.Domain{Name: inst}))
	_, err = c.Teardown(t.Context(), inst, nil)
	require.ErrorIs(t, err, ErrNotManaged)
	assert.Equal(t, "domain gci-r-1 running=true", f.State(), "an unmanaged domain is never touched")
}

// A volume that cannot be deleted keeps the domain (and its record of the volume).
func TestTeardownKeepsRecordWhenVolumeDeleteFails(t *testing.T) {
	t.Parallel()
	f := provisiontest.New("ci")
	c := &Conn{api: f}
	_, err := c.Create(context.Background(), instanceSpec(t, "ci"))
	require.NoError(t, err)
	f.Fail("StorageVolDelete", libvirt.Error{Code: uint32(libvirt.ErrInternalError), Message: "device busy"})
	_, err = c.Teardown(t.Context(), inst, nil)
	require.ErrorContains(t, err, "device busy")
	assert.Contains(t, f.State(), "domain gci-r-1 running=false")
	assert.Contains(t, f.State(), "volume ci/gci-r-1-vda.qcow2")

	f.Fail("StorageVolDelete", nil)
	_, err = c.Teardown(t.Context(), inst, nil)
	require.NoError(t, err)
	assert.Empty(t, f.State())
}

func TestTemplateXML(t *testing.T) {
	t.Parallel()
	f := provisiontest.New("ci")
	c := &Conn{api: f}
	_, err := f.DomainDefineXMLFlags(`<domain type='qemu'><name>tmpl</name></domain>`, 0)
	require.NoError(t, err)
	x, marked, err := c.TemplateXML("tmpl")
	require.NoError(t, err)
	assert.Contains(t, x, "<name>tmpl</name>")
	assert.False(t, marked, "no domain is a template until the operator marks it")

	require.NoError(t, c.MarkTemplate("tmpl", true))
	_, marked, err = c.TemplateXML("tmpl")
	require.NoError(t, err)
	assert.True(t, marked)
	list, err := c.Templates()
	require.NoError(t, err)
	assert.Equal(t, []TemplateInfo{{Name: "tmpl", Marked: true, Shutoff: true}}, list)
	require.NoError(t, c.MarkTemplate("tmpl", false))
	_, marked, err = c.TemplateXML("tmpl")
	require.NoError(t, err)
	assert.False(t, marked, "unmarked")

	_, _, err = c.TemplateXML("nope")
	assert.ErrorIs(t, err, ErrNoTemplate)

	require.NoError(t, f.DomainCreate(libvirt.Domain{Name: "tmpl"}))
	_, _, err = c.TemplateXML("tmpl")
	assert.ErrorIs(t, err, ErrNotTemplate)
	assert.ErrorContains(t, err, `template "tmpl" is not shut off`)

	_, err = c.Create(context.Background(), instanceSpec(t, "ci"))
	require.NoError(t, err)
	require.NoError(t, f.DomainDestroyFlags(libvirt.Domain{Name: inst}, 0))
	_, _, err = c.TemplateXML(inst)
	assert.ErrorIs(t, err, ErrNotTemplate)
	assert.ErrorContains(t, c.MarkTemplate(inst, true), "is a libvirt-gci instance")
	list, err = c.Templates()
	require.NoError(t, err)
	assert.Equal(t, []TemplateInfo{{Name: "tmpl"}}, list, "instances are not listed")
}

// Teardown leaves alone an instance its caller does not own, touching nothing.
func TestTeardownAsksFirst(t *testing.T) {
	t.Parallel()
	f := provisiontest.New("ci")
	c := &Conn{api: f}
	_, err := c.Create(context.Background(), instanceSpec(t, "ci"))
	require.NoError(t, err)
	before := f.State()
	var seen meta.Metadata
	_, err = c.Teardown(t.Context(), inst, func(m meta.Metadata) error { seen = m; return errors.New("not yours") })
	require.EqualError(t, err, "not yours")
	assert.Equal(t, before, f.State())
	assert.Equal(t, "p1", seen.PrepareID)
	r, err := c.Teardown(t.Context(), inst, func(meta.Metadata) error { return nil })
	require.NoError(t, err)
	assert.True(t, r.Domain)
	assert.Empty(t, f.State())
}

// What prepare adds for the ssh transport, and what later stages read back.
func TestSSHMetadataAndForward(t *testing.T) {
	f := provisiontest.New("p")
	c := &Conn{api: f}
	spec := instanceSpec(t, "p")
	_, err := c.Create(context.Background(), spec)
	require.NoError(t, err)

	port, err := c.ForwardedPort(spec.Name, 22)
	require.NoError(t, err)
	assert.Equal(t, 40022, port)
	_, err = c.ForwardedPort(spec.Name, 2222)
	assert.ErrorContains(t, err, "no forward from 127.0.0.1 to guest port 2222")

	inst, err := c.Lookup(spec.Name)
	require.NoError(t, err)
	m := inst.Metadata
	m.SSH = &meta.SSH{Host: "127.0.0.1", Port: port, User: "root", HostKey: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB7 libvirt-gci"}
	require.NoError(t, c.SetMetadata(spec.Name, m))
	inst, err = c.Lookup(spec.Name)
	require.NoError(t, err)
	assert.Equal(t, m, inst.Metadata)

	// Teardown still finds the volumes through the new metadata.
	r, err := c.Teardown(t.Context(), spec.Name, nil)
	require.NoError(t, err)
	assert.Len(t, r.Volumes, len(spec.Volumes))
}

func TestParseForward(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		want     int
	}{
		{"qemu 7.2", "Hub -1 (n):\r\n  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n  TCP[HOST_FORWARD]   3       127.0.0.1 41639       10.0.2.15    22     0     0\r\n", 41639},
		{"bound elsewhere", "  TCP[HOST_FORWARD]   3       0.0.0.0 41639       10.0.2.15    22     0     0\n", 0},
		{"udp", "  UDP[HOST_FORWARD]   3       127.0.0.1 41639       10.0.2.15    22     0     0\n", 0},
		{"other port", "  TCP[HOST_FORWARD]   3       127.0.0.1 41639       10.0.2.15    2222     0     0\n", 0},
		{"garbage port", "  TCP[HOST_FORWARD]   3       127.0.0.1 99999       10.0.2.15    22     0     0\n", 0},
		{"empty", "", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseForward(tc.in, 22)
			if tc.want == 0 {
				assert.Error(t, err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}

// Instances are found by our metadata, whatever their names.
func TestInstances(t *testing.T) {
	t.Parallel()
	f := provisiontest.New("ci")
	c := &Conn{api: f}
	_, err := c.Create(context.Background(), instanceSpec(t, "ci"))
	require.NoError(t, err)
	_, err = f.DomainDefineXMLFlags(`<domain type='qemu'><name>gci-r-2</name></domain>`, 0) // our prefix, not ours
	require.NoError(t, err)
	list, err := c.Instances()
	require.NoError(t, err)
	require.Len(t, list, 1)
	assert.Equal(t, inst, list[0].Name)
	assert.Equal(t, "running", list[0].State)
	assert.Equal(t, "1", list[0].Metadata.Owner.JobID)
}

// A volume that libvirtd is still creating (the prepare that asked for it was killed)
// cannot be deleted yet: Teardown waits for it.
func TestTeardownWaitsForAVolumeBeingCreated(t *testing.T) {
	t.Parallel()
	f := provisiontest.New("ci")
	c := &Conn{api: f}
	_, err := c.Create(context.Background(), instanceSpec(t, "ci"))
	require.NoError(t, err)
	f.FailNth("StorageVolDelete", 1, libvirt.Error{Code: uint32(libvirt.ErrOperationInvalid), Message: "volume 'x' is still being allocated."})
	r, err := c.Teardown(t.Context(), inst, nil)
	require.NoError(t, err)
	assert.Len(t, r.Volumes, 2)
	assert.Empty(t, f.State())

	// A volume busy for good: the wait ends with the context (a cancelled cleanup does not
	// sit out volumeBusyTime), and the domain stays, so that a later Teardown still knows
	// the volume.
	_, err = c.Create(t.Context(), instanceSpec(t, "ci"))
	require.NoError(t, err)
	f.Fail("StorageVolDelete", libvirt.Error{Code: uint32(libvirt.ErrOperationInvalid), Message: "volume 'x' is still being allocated."})
	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = c.Teardown(ctx, inst, nil)
	require.ErrorContains(t, err, "still busy")
	assert.Less(t, time.Since(start), 2*time.Second, "the wait ended with the context, not after %s", volumeBusyTime)
	assert.Contains(t, f.State(), "domain "+inst)
	f.Fail("StorageVolDelete", nil)
	_, err = c.Teardown(t.Context(), inst, nil)
	require.NoError(t, err)
	assert.Empty(t, f.State())
}
