package dial

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/crypto/ssh"
)

// sshFiles writes a client key and a known_hosts file with hostKey for host:port.
func sshFiles(t *testing.T, hostPort string, hostKey ssh.PublicKey) (keyfile, known string) {
	t.Helper()
	dir := t.TempDir()
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	block, err := ssh.MarshalPrivateKey(priv, "")
	require.NoError(t, err)
	keyfile, known = filepath.Join(dir, "id"), filepath.Join(dir, "known_hosts")
	require.NoError(t, os.WriteFile(keyfile, pem.EncodeToMemory(block), 0o600))
	line := ""
	if hostKey != nil {
		line = "[" + hostPort[:len(hostPort)-5] + "]:" + hostPort[len(hostPort)-4:] + " " + string(ssh.MarshalAuthorizedKey(hostKey))
	}
	require.NoError(t, os.WriteFile(known, []byte(line), 0o600))
	return keyfile, known
}

func TestSSHDialerRefusesWhatTurnsOffHostKeys(t *testing.T) {
	t.Parallel()
	key, known := sshFiles(t, "127.0.0.1:2222", nil)
	for q, want := range map[string]string{
		"no_verify=1":               "no_verify turns off host key checking",
		"known_hosts_verify=ignore": "known_hosts_verify=ignore is not supported",
		"known_hosts_verify=auto":   "known_hosts_verify=auto is not supported",
	} {
		u, _ := url.Parse("qemu+ssh://root@127.0.0.1:2222/system?keyfile=" + key + "&known_hosts=" + known + "&" + q)
		_, err := newSSHDialer(context.Background(), u)
		assert.ErrorContains(t, err, want, q)
	}
	u, _ := url.Parse("qemu+ssh://root@127.0.0.1:2222/system?keyfile=/nonexistent&known_hosts=" + known)
	_, err := newSSHDialer(context.Background(), u)
	assert.ErrorContains(t, err, "/nonexistent")
}

func TestSSHDialerAlgorithmsFromKnownHosts(t *testing.T) {
	t.Parallel()
	pub, _, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	hk, err := ssh.NewPublicKey(pub)
	require.NoError(t, err)
	key, known := sshFiles(t, "127.0.0.1:2222", hk)
	addr := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 2222}
	addr3 := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 2223}
	u, _ := url.Parse("qemu+ssh://root@127.0.0.1:2222/system?keyfile=" + key + "&known_hosts=" + known)
	d, err := newSSHDialer(context.Background(), u)
	require.NoError(t, err)
	assert.Equal(t, "root", d.user)
	assert.Equal(t, defaultLibvirtSocket, d.socket)
	assert.Equal(t, []string{ssh.KeyAlgoED25519}, d.algorithms(addr))

	other, _, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	ok, _ := ssh.NewPublicKey(other)
	err = d.hostKey("127.0.0.1:2222", addr, ok)
	var hkErr *HypervisorKeyError
	require.ErrorAs(t, err, &hkErr)
	assert.Contains(t, err.Error(), "host key mismatch at 127.0.0.1:2222")
	assert.Contains(t, err.Error(), ssh.FingerprintSHA256(hk))
	assert.NoError(t, d.hostKey("127.0.0.1:2222", addr, hk))

	u, _ = url.Parse("qemu+ssh://root@127.0.0.1:2223/system?keyfile=" + key + "&known_hosts=" + known)
	d, err = newSSHDialer(context.Background(), u)
	require.NoError(t, err)
	assert.Nil(t, d.algorithms(addr))
	assert.ErrorContains(t, d.hostKey("127.0.0.1:2223", addr3, hk), "127.0.0.1:2223 is not in "+known)
}
