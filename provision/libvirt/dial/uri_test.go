package dial

import (
	"context"
	"net/url"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestIsLocal(t *testing.T) {
	t.Parallel()
	for uri, local := range map[string]bool{
		"qemu:///system": true, "qemu:///session": true, "test:///default": true, "qemu+unix:///system": true,
		"qemu+ssh://root@h/system": false, "qemu+tcp://h/system": false, "qemu://h/system": false,
	} {
		assert.Equal(t, local, IsLocal(uri), uri)
	}
	assert.True(t, ReachesHost("qemu+ssh://root@h/system"))
	assert.False(t, ReachesHost("qemu+tls://h/system"))
}

func TestFor(t *testing.T) {
	t.Parallel()
	for uri, hostDialer := range map[string]bool{"qemu:///system": true, "test:///default": true, "qemu:///session?socket=/x": true,
		"qemu+unix:///system": true} {
		u, err := url.Parse(uri)
		require.NoError(t, err)
		d, err := For(context.Background(), u)
		require.NoError(t, err, uri)
		_, ok := d.(HostDialer)
		assert.Equal(t, hostDialer, ok, uri)
	}
	for _, uri := range []string{"qemu+tls://h:16514/system?pkipath=/nonexistent", "qemu://h/system?pkipath=/nonexistent"} {
		u, _ := url.Parse(uri)
		_, err := For(context.Background(), u)
		assert.ErrorContains(t, err, "no PKI files for TLS (name their directory with ?pkipath=DIR): open /nonexistent/cacert.pem", uri)
	}
	u, _ := url.Parse("qemu+tls://h/system?no_verify=1")
	_, err := For(context.Background(), u)
	assert.ErrorContains(t, err, "no_verify turns off the check")
	for _, uri := range []string{"qemu+libssh2://h/system", "qemu+ext:///system"} {
		u, _ := url.Parse(uri)
		_, err := For(context.Background(), u)
		assert.ErrorContains(t, err, "is not supported; want", uri)
	}
}

// qemu+tcp is a libvirtd without authentication: refused, pointing to ssh or tls, both
// when settings are read and when a connection is dialled.
func TestPlainTCPRefused(t *testing.T) {
	for _, uri := range []string{"qemu+tcp://192.168.122.1/system", "qemu+tcp://h:16509/system?x=1"} {
		err := Check(uri)
		require.ErrorIs(t, err, ErrPlainTCP, uri)
		require.Contains(t, err.Error(), "qemu+ssh://")
		require.Contains(t, err.Error(), uri)
		u, _ := url.Parse(uri)
		_, err = For(context.Background(), u)
		require.ErrorIs(t, err, ErrPlainTCP)
	}
	for _, uri := range []string{"qemu:///system", "qemu+ssh://u@h/system", "qemu+tls://h/system", "qemu://h/system"} {
		require.NoError(t, Check(uri), uri)
	}
	require.ErrorContains(t, Check("qemu+foo://h/system"), `transport "foo" is not supported`)
}

// What a job's log may show of a URI: no key, known_hosts or PKI paths, no password.
func TestPublic(t *testing.T) {
	t.Parallel()
	for uri, want := range map[string]string{
		"qemu:///system": "qemu:///system",
		"qemu+ssh://ci@hv1:2222/system?keyfile=/root/.ssh/id&known_hosts=/etc/gci/kh": "qemu+ssh://ci@hv1:2222/system",
		"qemu+tls://hv2/system?pkipath=/etc/pki/gci":                                  "qemu+tls://hv2/system",
		"qemu+ssh://u:secret@h/system":                                                "qemu+ssh://u@h/system",
		"qemu:///session?socket=/run/user/1000/libvirt/virtqemud-sock":                "qemu:///session",
	} {
		assert.Equal(t, want, Public(uri), uri)
	}
}
