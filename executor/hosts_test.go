package executor

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"libvirt.org/go/libvirtxml"

	"github.com/libvirt-gci/libvirt-gci/provision"
	"github.com/libvirt-gci/libvirt-gci/provision/meta"
	"github.com/libvirt-gci/libvirt-gci/provision/provisiontest"
)

// fleet is an Executor over fake hosts by URI; a URI without one is down.
func fleet(t *testing.T, uris string, hosts map[string]*provisiontest.Libvirt) (*Executor, *bytes.Buffer) {
	s := settings()
	s.URI = uris
	var log bytes.Buffer
	return &Executor{Settings: s, Log: slog.New(slog.NewTextHandler(&log, nil)), Stdout: io.Discard, Stderr: io.Discard,
		Dial: func(_ context.Context, uri string) (*provision.Conn, error) {
			if f, ok := hosts[uri]; ok {
				return provision.NewConn(f), nil
			}
			return nil, errors.New("connection refused")
		}}, &log
}

// instance defines a running instance on f, placed by uri.
func instance(t *testing.T, f *provisiontest.Libvirt, name, uri string) {
	t.Helper()
	md, err := meta.Metadata{Template: "debian-12", URI: uri}.MarshalElement()
	require.NoError(t, err)
	x, err := (&libvirtxml.Domain{Type: "qemu", Name: name, Memory: &libvirtxml.DomainMemory{Value: 1 << 20, Unit: "KiB"},
		Metadata: &libvirtxml.DomainMetadata{XML: md}}).Marshal()
	require.NoError(t, err)
	d, err := f.DomainDefineXMLFlags(x, 0)
	require.NoError(t, err)
	require.NoError(t, f.DomainCreate(d))
}

func TestPlaceOnTheHostWithRoom(t *testing.T) {
	t.Parallel()
	a, b := provisiontest.New("default"), provisiontest.New("default")
	instance(t, a, "gci-busy", "test:///a")
	e, log := fleet(t, "test:///a test:///down, test:///b", map[string]*provisiontest.Libvirt{"test:///a": a, "test:///b": b})
	e.Settings.Limits.Instances = 1
	h, err := e.place(context.Background())
	require.NoError(t, err)
	assert.Equal(t, "test:///b", h.URI, "a is full")
	assert.Contains(t, log.String(), "skipping test:///down: connection refused")
	assert.Contains(t, log.String(), "placed on test:///b (0 instances")

	e.Settings.Limits.Instances, e.Settings.Limits.MemoryTotal = 0, 4<<30
	instance(t, b, "gci-big", "test:///b")
	instance(t, b, "gci-big2", "test:///b")
	h, err = e.place(context.Background())
	require.NoError(t, err)
	assert.Equal(t, "test:///a", h.URI, "a has 3 GiB left under the memory limit, b 2 GiB")

	e, _ = fleet(t, "test:///x test:///y", nil)
	_, err = e.place(context.Background())
	assert.ErrorContains(t, err, "none of the 2 hosts of LIBVIRT_GCI_URI answered")
}

func TestLocateTheRecordedHost(t *testing.T) {
	t.Parallel()
	one := provisiontest.New("default") // one libvirt under two URIs
	other := provisiontest.New("default")
	instance(t, one, "gci-job", "test:///second")
	e, _ := fleet(t, "test:///first test:///other test:///second", map[string]*provisiontest.Libvirt{
		"test:///first": one, "test:///second": one, "test:///other": other})
	h, err := e.locate(context.Background(), "gci-job")
	require.NoError(t, err)
	assert.Equal(t, "test:///second", h.URI, "where prepare placed it, though another URI reaches it too")

	h, err = e.locate(context.Background(), "gci-none")
	require.NoError(t, err, "on no host that answered, and all did: as with one host, the first says no such instance")
	assert.Equal(t, "test:///first", h.URI)

	e, _ = fleet(t, "test:///down test:///other", map[string]*provisiontest.Libvirt{"test:///other": other})
	_, err = e.locate(context.Background(), "gci-job")
	assert.ErrorContains(t, err, `instance "gci-job" is on none of the hosts that answered, and 1 did not: test:///down: connection refused`)
}

func TestMarkOnEveryHostThatHasIt(t *testing.T) {
	t.Parallel()
	a, b := provisiontest.New("default"), provisiontest.New("default")
	_, err := a.DomainDefineXMLFlags(provisiontest.Template, 0) // "tmpl", on a only
	require.NoError(t, err)
	e, log := fleet(t, "test:///a test:///b", map[string]*provisiontest.Libvirt{"test:///a": a, "test:///b": b})
	require.NoError(t, e.MarkTemplates(context.Background(), []string{"tmpl"}, true))
	assert.Contains(t, log.String(), "marked tmpl as a template on test:///a")
	assert.NotContains(t, log.String(), "on test:///b")
	list, err := provision.NewConn(a).Templates()
	require.NoError(t, err)
	require.Len(t, list, 1)
	assert.True(t, list[0].Marked)

	err = e.MarkTemplates(context.Background(), []string{"nowhere"}, true)
	assert.ErrorContains(t, err, `no host of LIBVIRT_GCI_URI has a domain named "nowhere"`)

	e, _ = fleet(t, "test:///a test:///down", map[string]*provisiontest.Libvirt{"test:///a": a})
	err = e.MarkTemplates(context.Background(), []string{"tmpl"}, false)
	assert.ErrorContains(t, err, "test:///down: connection refused", "a host that is down is an error: its mark is unknown")
	list, err = provision.NewConn(a).Templates()
	require.NoError(t, err)
	assert.False(t, list[0].Marked, "unmarked where it could be")
}
