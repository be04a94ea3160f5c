package provision

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"libvirt.org/go/libvirtxml"

	"github.com/libvirt-gci/libvirt-gci/provision/meta"
	"github.com/libvirt-gci/libvirt-gci/provision/provisiontest"
)

// failedInstance launches name for project (of the same GitLab) with a cache share and
// marks its job failed, as run does.
func failedInstance(t *testing.T, f *provisiontest.Libvirt, h *Host, name, project string) {
	t.Helper()
	req := launchReq(name)
	req.Owner = meta.Owner{Server: "gl", ProjectID: project, JobID: name}
	req.Cache, req.CacheMount = "/var/cache/gci/p-"+project+"/unprotected", "/cache"
	require.NoError(t, h.Launch(context.Background(), req))
	conn := NewConn(f)
	in, err := conn.Lookup(name)
	require.NoError(t, err)
	m := in.Metadata
	m.FailedAt = time.Now().UTC().Format(time.RFC3339)
	require.NoError(t, conn.SetMetadata(name, m))
}

// A kept VM can no longer act (issue 24): it is stopped, its definition has no cache
// share, no ssh NIC and its links down, and it no longer counts as a running instance.
// Kept VMs have bounds of their own, per project and in all; past them a failed job's
// VM is not kept, and says why.
func TestKeepDisarmsAndIsBounded(t *testing.T) {
	t.Parallel()
	f := provisiontest.New("ci")
	var log bytes.Buffer
	h := readyHost(t, f, &log, time.Minute)
	h.Limits = Limits{Instances: 1, Kept: 2, KeptPerProject: 1}
	failedInstance(t, f, h, "gci-a", "42")
	x, err := f.DomainGetXMLDesc(golibvirt.Domain{Name: "gci-a"}, golibvirt.DomainXMLInactive)
	require.NoError(t, err)
	require.Contains(t, x, "<filesystem", "a cache share to take away")
	until, why, err := h.Keep(context.Background(), "gci-a", nil, time.Hour)
	require.NoError(t, err)
	assert.Empty(t, why)
	assert.WithinDuration(t, time.Now().Add(time.Hour), until, 2*time.Second)

	conn := NewConn(f)
	in, err := conn.Lookup("gci-a")
	require.NoError(t, err)
	assert.Equal(t, until.Format(time.RFC3339), in.Metadata.KeepUntil)
	state, _, err := f.DomainGetState(golibvirt.Domain{Name: "gci-a"}, 0)
	require.NoError(t, err)
	assert.Equal(t, int32(golibvirt.DomainShutoff), state, "stopped: what the job left running is gone")
	x, err = f.DomainGetXMLDesc(golibvirt.Domain{Name: "gci-a"}, golibvirt.DomainXMLInactive)
	require.NoError(t, err)
	var dom libvirtxml.Domain
	require.NoError(t, dom.Unmarshal(x))
	assert.Empty(t, dom.Devices.Filesystems, "no cache share if started again")
	require.NotEmpty(t, dom.Devices.Interfaces)
	for _, i := range dom.Devices.Interfaces {
		require.NotNil(t, i.Link)
		assert.Equal(t, "down", i.Link.State)
	}
	assert.Nil(t, dom.QEMUCommandline)

	// MAX_INSTANCES is 1: the kept VM does not hold the room.
	failedInstance(t, f, h, "gci-b", "42")
	until, why, err = h.Keep(context.Background(), "gci-b", nil, time.Hour)
	require.NoError(t, err)
	assert.True(t, until.IsZero())
	assert.Equal(t, "1 of 1 kept VMs of this project (LIBVIRT_GCI_KEEP_FAILED_PER_PROJECT)", why)
	err = h.Remove(context.Background(), "gci-b", nil)
	require.NoError(t, err)

	failedInstance(t, f, h, "gci-c", "43")
	_, why, err = h.Keep(context.Background(), "gci-c", nil, time.Hour)
	require.NoError(t, err)
	assert.Empty(t, why, "another project's")
	failedInstance(t, f, h, "gci-d", "44")
	_, why, err = h.Keep(context.Background(), "gci-d", nil, time.Hour)
	require.NoError(t, err)
	assert.Equal(t, "2 of 2 kept VMs in all (LIBVIRT_GCI_KEEP_FAILED_MAX)", why)
}

// LIBVIRT_GCI_MAX_AGE wins over keep-failed: a VM is kept until then at most, and gc
// removes a kept VM past it.
func TestKeepNeverPastMaxAge(t *testing.T) {
	t.Parallel()
	f := provisiontest.New("ci")
	var log bytes.Buffer
	h := readyHost(t, f, &log, time.Minute)
	h.MaxAge = 30 * time.Minute
	failedInstance(t, f, h, "gci-a", "42")
	until, _, err := h.Keep(context.Background(), "gci-a", nil, 2*time.Hour)
	require.NoError(t, err)
	assert.WithinDuration(t, time.Now().Add(30*time.Minute), until, 2*time.Second)

	conn := NewConn(f)
	in, err := conn.Lookup("gci-a")
	require.NoError(t, err)
	m := in.Metadata
	m.CreatedAt = time.Now().Add(-time.Hour).UTC().Format(time.RFC3339)
	m.KeepUntil = time.Now().Add(time.Hour).UTC().Format(time.RFC3339) // as an older tool wrote it
	require.NoError(t, conn.SetMetadata("gci-a", m))
	sw, err := h.GC(context.Background(), false, 0)
	require.NoError(t, err)
	assert.Equal(t, 1, sw.Removed)
	assert.Contains(t, log.String(), "older than LIBVIRT_GCI_MAX_AGE 30m0s")
}

// A kept VM restored from a warm image stands on that image's overlay: the image stays
// while the kept VM does, though its template changed and the next job made a new one
// (issue 36: a shut-off domain's XML has no backing chain, and names its image only in
// its metadata); once the kept VM is gone, the next new image's making removes it.
func TestKeptVMKeepsItsWarmImage(t *testing.T) {
	t.Parallel()
	f, _, h, warm := firstRestore(t)
	h.Limits = Limits{Kept: 2, KeptPerProject: 1}
	conn := NewConn(f)
	in, err := conn.Lookup("gci-a")
	require.NoError(t, err)
	require.Equal(t, warm, in.Metadata.Warm)
	m := in.Metadata
	m.FailedAt = time.Now().UTC().Format(time.RFC3339)
	require.NoError(t, conn.SetMetadata("gci-a", m))
	until, why, err := h.Keep(context.Background(), "gci-a", nil, time.Hour)
	require.NoError(t, err)
	require.False(t, until.IsZero(), why)

	x, err := f.DomainGetXMLDesc(golibvirt.Domain{Name: "tmpl"}, golibvirt.DomainXMLInactive)
	require.NoError(t, err)
	_, err = f.DomainDefineXMLFlags(strings.Replace(x, "</domain>", "<description>changed</description></domain>", 1), 0)
	require.NoError(t, err)
	require.NoError(t, h.Launch(context.Background(), launchReq("gci-b")))
	in, err = conn.Lookup("gci-b")
	require.NoError(t, err)
	require.NotEqual(t, warm, in.Metadata.Warm, "the changed template has a new image")
	assert.Contains(t, f.State(), "volume ci/"+warm+".done", "the kept VM's image stays")
	assert.Contains(t, f.State(), "volume ci/"+warm+"-vda.qcow2", "the kept VM's disk stands on it")

	// Old images go when the next one is made (as ever).
	require.NoError(t, h.Remove(context.Background(), "gci-a", nil))
	_, err = f.DomainDefineXMLFlags(strings.Replace(x, "</domain>", "<description>changed again</description></domain>", 1), 0)
	require.NoError(t, err)
	require.NoError(t, h.Launch(context.Background(), launchReq("gci-c")))
	assert.NotContains(t, f.State(), "volume ci/"+warm, "once no domain stands on it, it goes")
}
