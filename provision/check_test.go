package provision

import (
	"context"
	"io"
	"log/slog"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/libvirt-gci/libvirt-gci/provision/libvirt"
	"github.com/libvirt-gci/libvirt-gci/provision/provisiontest"
)

func checkHost(f *provisiontest.Libvirt) *Host {
	return &Host{Config: Config{Pool: "ci", Prefix: "gci-"}, Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
		Dial: func(context.Context, string) (*libvirt.Conn, error) { return libvirt.NewConn(f), nil }}
}

func failed(checks []Finding) []string {
	var out []string
	for _, c := range checks {
		if c.Status != FindingOK {
			out = append(out, c.Check+": "+c.Fix)
		}
	}
	return out
}

func TestCheckTemplate(t *testing.T) {
	f := provisiontest.New("ci")
	h := checkHost(f)
	_, err := f.DomainDefineXMLFlags(provisiontest.Template, 0)
	require.NoError(t, err)

	checks, err := h.CheckTemplate(context.Background(), "tmpl", true)
	require.NoError(t, err)
	assert.Empty(t, failed(checks))
	assert.Greater(t, len(checks), 5)

	checks, err = h.CheckTemplate(context.Background(), "tmpl", false)
	require.NoError(t, err)
	assert.Equal(t, []string{"offered to jobs (marked, or listed in LIBVIRT_GCI_TEMPLATES): libvirt-gci template mark tmpl"}, failed(checks))

	bad := strings.NewReplacer("<name>tmpl</name>", "<name>bad</name>",
		"<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>", "").Replace(provisiontest.Template)
	_, err = f.DomainDefineXMLFlags(bad, 0)
	require.NoError(t, err)
	checks, err = h.CheckTemplate(context.Background(), "bad", false)
	require.NoError(t, err)
	got := failed(checks)
	require.Len(t, got, 2, got)
	assert.Contains(t, got[0], "offered to jobs")
	assert.Contains(t, got[1], "the guest agent channel: add <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>")

	vmdk := strings.NewReplacer("<name>tmpl</name>", "<name>vmdk</name>", "type='qcow2'", "type='vmdk'").Replace(provisiontest.Template)
	_, err = f.DomainDefineXMLFlags(vmdk, 0)
	require.NoError(t, err)
	checks, err = h.CheckTemplate(context.Background(), "vmdk", true)
	require.NoError(t, err)
	assert.Equal(t, []string{`disks libvirt-gci can clone (file-backed, qcow2 or raw): template "vmdk": disk "vda" has format "vmdk"; only qcow2 and raw can back an overlay`}, failed(checks))

	checks, err = h.CheckTemplate(context.Background(), "nosuch", true)
	require.NoError(t, err)
	assert.Equal(t, []string{"a libvirt domain named nosuch: define one (virsh define), or check LIBVIRT_GCI_URI ()"}, failed(checks))
}
