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
		"qemu+unix:///system": true, "qemu+tcp://h/system": false} {
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
