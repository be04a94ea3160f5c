package main

// End-to-end tests of what only the ssh transport has: per-instance client keys, the
// pinned host key, the guest's restricted network, and no key material anywhere. They
// run on the template with a NIC of its own (the harder case: the NIC prepare adds is not
// the guest's first, and the guest leaves it unconfigured); the job suite runs over ssh
// on the template without one.

import (
	"bytes"
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"encoding/xml"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/crypto/ssh"

	"github.com/libvirt-gci/libvirt-gci/guest"
	"github.com/libvirt-gci/libvirt-gci/provision"
	"github.com/libvirt-gci/libvirt-gci/provision/meta"
)

// agentExec runs a shell command in the guest through the guest agent, as a test's own
// trusted side door, and returns its stdout.
func agentExec(t *testing.T, l *libvirt.Libvirt, name, script string) string {
	t.Helper()
	dom, err := l.DomainLookupByName(name)
	require.NoError(t, err)
	cmd, _ := json.Marshal(map[string]any{"execute": "guest-exec", "arguments": map[string]any{
		"path": "/bin/sh", "arg": []string{"-c", script}, "capture-output": true}})
	out, err := l.QEMUDomainAgentCommand(dom, string(cmd), 10, 0)
	require.NoError(t, err)
	var started struct{ Return struct{ PID int } }
	require.NoError(t, json.Unmarshal([]byte(out[0]), &started))
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		q, _ := json.Marshal(map[string]any{"execute": "guest-exec-status", "arguments": map[string]any{"pid": started.Return.PID}})
		out, err := l.QEMUDomainAgentCommand(dom, string(q), 10, 0)
		require.NoError(t, err)
		var st struct {
			Return struct {
				Exited  bool
				OutData string `json:"out-data"`
			}
		}
		require.NoError(t, json.Unmarshal([]byte(out[0]), &st))
		if st.Return.Exited {
			b, _ := base64.StdEncoding.DecodeString(st.Return.OutData)
			return string(b)
		}
	}
	t.Fatalf("guest command did not finish: %s", script)
	return ""
}

// instanceSSH is what the metadata of an ssh instance says, and its UUID.
func instanceSSH(t *testing.T, l *libvirt.Libvirt, name string) (meta.SSH, [16]byte) {
	t.Helper()
	dom, err := l.DomainLookupByName(name)
	require.NoError(t, err)
	x, err := l.DomainGetMetadata(dom, int32(libvirt.DomainMetadataElement), libvirt.OptString{meta.NS}, 0)
	require.NoError(t, err)
	var m meta.Metadata
	require.NoError(t, xmlUnmarshal(x, &m))
	require.NotNil(t, m.SSH, "no ssh in the metadata: %s", x)
	return *m.SSH, dom.UUID
}

// dialAs opens an SSH connection to an instance's forward with the given client key.
func dialAs(t *testing.T, info meta.SSH, key ssh.Signer) (*ssh.Client, error) {
	hostKey, _, _, _, err := ssh.ParseAuthorizedKey([]byte(info.HostKey))
	require.NoError(t, err)
	return ssh.Dial("tcp", net.JoinHostPort(info.Host, fmt.Sprint(info.Port)), &ssh.ClientConfig{
		User: info.User, Auth: []ssh.AuthMethod{ssh.PublicKeys(key)},
		HostKeyCallback: ssh.FixedHostKey(hostKey), Timeout: 30 * time.Second,
	})
}

// newSSHJob is a job over ssh on the template with a NIC of its own.
func newSSHJob(t testing.TB) *gitlabJob {
	t.Helper()
	j := newJobOver(t, "ssh")
	j.env["CUSTOM_ENV_DISTRO"] = testNICTmpl
	return j
}

// On a template with a NIC of its own, whose guest configures only its first interface
// (on 10.0.2.0/24, as for libvirt's user networking), prepare finds its own NIC by the MAC
// address it gave it and configures it from the host side, on a subnet of its own.
func TestSSHOnATemplateWithItsOwnNIC(t *testing.T) {
	t.Parallel()
	j := newSSHJob(t)
	r := j.stage("prepare")
	require.Equal(t, 0, r.code, "prepare failed:\n%s", r.stderr)
	t.Cleanup(func() { j.stage("cleanup") })
	assert.Contains(t, r.stderr, "ssh ready after")
	name := j.instance()
	dom, err := j.l.DomainLookupByName(name)
	require.NoError(t, err)
	x, err := j.l.DomainGetXMLDesc(dom, 0)
	require.NoError(t, err)
	var d struct {
		Interfaces []struct {
			MAC struct {
				Address string `xml:"address,attr"`
			} `xml:"mac"`
		} `xml:"devices>interface"`
		Args []struct {
			Value string `xml:"value,attr"`
		} `xml:"commandline>arg"`
	}
	require.NoError(t, xmlUnmarshal(x, &d))
	require.Len(t, d.Interfaces, 1, "the template's own NIC")
	own := d.Interfaces[0].MAC.Address
	var ours string
	for _, a := range d.Args {
		if i := strings.Index(a.Value, "mac="); i >= 0 {
			ours = a.Value[i+4:]
		}
	}
	require.NotEmpty(t, ours, "the NIC prepare adds has a MAC address of its own: %s", x)
	assert.NotEqual(t, own, ours)

	r = j.run("build_script", `for d in /sys/class/net/eth*; do echo "${d##*/} $(cat $d/address) $(busybox ip -4 -o addr show dev ${d##*/} | awk '{print $4}' | tr '
' ' ')"; done`)
	require.Equal(t, 0, r.code, r.stderr)
	assert.Contains(t, r.stdout, "eth0 "+own+" 10.0.2.15/24", "the guest configured its first NIC, the template's")
	assert.Contains(t, r.stdout, "eth1 "+ours+" "+provision.SSHGuestAddr+"/24", "prepare configured its own")
	assert.Equal(t, 0, j.stage("cleanup").code)
}

// A guest whose host key changes after prepare is refused, and the stage's script never
// reaches it.
func TestSSHHostKeySwapRefused(t *testing.T) {
	t.Parallel()
	j := newSSHJob(t)
	j.prepare()
	name := j.instance()
	r := j.run("build_script", "echo before the swap")
	require.Equal(t, 0, r.code, r.stderr)

	agentExec(t, j.l, name, `rm -f /etc/ssh/ssh_host_*; ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key && kill -HUP "$(cat /run/sshd.pid)"`)
	// sshd re-executes itself on HUP; until it listens again a stage fails differently.
	require.Eventually(t, func() bool {
		r = j.run("build_script", "touch /tmp/ran-after-swap")
		return strings.Contains(r.stderr, "host key mismatch")
	}, time.Minute, 200*time.Millisecond, "last try: %+v", r)
	assert.Equal(t, 2, r.code, "a system failure")
	assert.Contains(t, r.stderr, "refusing to connect")
	assert.Equal(t, 1, strings.Count(r.stderr, "\n"), "one line: %q", r.stderr)
	assert.Equal(t, "not run\n", agentExec(t, j.l, name, `test -e /tmp/ran-after-swap && echo ran || echo "not run"`))
	assert.Equal(t, 0, j.stage("cleanup").code)
}

// Two instances of one template, on one runner host (one secret), have different client
// keys: each works, and neither key opens the other instance.
func TestSSHKeysPerInstance(t *testing.T) {
	t.Parallel()
	a, b := newSSHJob(t), newSSHJob(t)
	b.env["LIBVIRT_GCI_SECRET_FILE"] = a.env["LIBVIRT_GCI_SECRET_FILE"]
	a.prepare()
	b.prepare()
	var authorized []string
	for _, j := range []*gitlabJob{a, b} {
		r := j.run("build_script", `grep libvirt-gci@ ~/.ssh/authorized_keys`)
		require.Equal(t, 0, r.code, r.stderr)
		assert.Equal(t, 1, strings.Count(r.stdout, "\n"), "one key of ours: %q", r.stdout)
		assert.Contains(t, r.stdout, "libvirt-gci@"+j.instance())
		authorized = append(authorized, strings.Fields(r.stdout)[1])
	}
	assert.NotEqual(t, authorized[0], authorized[1], "each instance has its own client key")

	secret, err := guest.LoadSecret(a.env["LIBVIRT_GCI_SECRET_FILE"], false)
	require.NoError(t, err)
	infoA, uuidA := instanceSSH(t, a.l, a.instance())
	infoB, uuidB := instanceSSH(t, b.l, b.instance())
	assert.NotEqual(t, infoA.Port, infoB.Port)
	assert.NotEqual(t, infoA.HostKey, infoB.HostKey, "each instance has its own host key")
	keyA, err := guest.ClientKey(secret, uuidA)
	require.NoError(t, err)
	keyB, err := guest.ClientKey(secret, uuidB)
	require.NoError(t, err)

	c, err := dialAs(t, infoB, keyB)
	require.NoError(t, err, "B's own key opens B")
	c.Close()
	_, err = dialAs(t, infoB, keyA)
	assert.ErrorContains(t, err, "unable to authenticate", "A's key must not open B")
	_, err = dialAs(t, infoA, keyB)
	assert.ErrorContains(t, err, "unable to authenticate", "B's key must not open A")
}

// The guest's network reaches nothing: no default route, and not the host either.
func TestSSHGuestHasNoRouteOut(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	var reached atomic.Int32
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			reached.Add(1)
			c.Close()
		}
	}()
	port := ln.Addr().(*net.TCPAddr).Port

	j := newSSHJob(t)
	j.prepare()
	// The host as QEMU's user networking shows it on prepare's NIC, and on 10.0.2.0/24.
	r := j.run("build_script", fmt.Sprintf(`busybox ip route
for h in 10.213.213.2 10.0.2.2; do busybox nc -w 3 $h %d </dev/null && echo "reached the host at $h" || echo "host blocked at $h"; done
busybox nc -w 3 192.0.2.1 80 </dev/null && echo "reached out" || echo "outside blocked"`, port))
	require.Equal(t, 0, r.code, r.stderr)
	assert.NotContains(t, r.stdout, "default")
	assert.Contains(t, r.stdout, "host blocked at 10.213.213.2")
	assert.Contains(t, r.stdout, "host blocked at 10.0.2.2")
	assert.Contains(t, r.stdout, "outside blocked")
	assert.Zero(t, reached.Load(), "the guest connected to the host's 127.0.0.1")
	assert.Equal(t, 0, j.stage("cleanup").code)
}

// No key material (the host secret, the instance's private key in any usual encoding)
// ends up in the domain's XML or metadata, in the tool's output even with --debug, or in
// any file outside the job's TMPDIR.
func TestSSHNoKeyMaterialLeaks(t *testing.T) {
	t.Parallel()
	start := time.Now()
	j := newSSHJob(t)
	j.env["LIBVIRT_GCI_DEBUG"] = "1"
	var out bytes.Buffer
	stage := func(args ...string) {
		r := j.stage(args...)
		require.Equal(t, 0, r.code, r.stderr)
		out.WriteString(r.stdout + r.stderr)
	}
	stage("config")
	stage("prepare")
	name := j.instance()
	stage("run", j.script("b.sh", "echo hello; env | grep -c . >&2"), "build_script")

	secretHex, err := os.ReadFile(j.env["LIBVIRT_GCI_SECRET_FILE"])
	require.NoError(t, err)
	secret, err := guest.LoadSecret(j.env["LIBVIRT_GCI_SECRET_FILE"], false)
	require.NoError(t, err)
	_, uuid := instanceSSH(t, j.l, name)
	signer, err := guest.ClientKey(secret, uuid)
	require.NoError(t, err)
	// The private key, re-derived as guest.ClientKey does, in the encodings a leak would use.
	priv := derivePrivate(t, secret, uuid)
	require.Equal(t, signer.PublicKey().Marshal(), mustSigner(t, priv).PublicKey().Marshal())
	block, err := ssh.MarshalPrivateKey(priv, "")
	require.NoError(t, err)
	pemLines := strings.Split(string(pem.EncodeToMemory(block)), "\n")
	needles := map[string]string{
		"secret (hex)":       strings.TrimSpace(string(secretHex)),
		"secret (base64)":    base64.StdEncoding.EncodeToString(secret),
		"seed (hex)":         hex.EncodeToString(priv.Seed()),
		"seed (base64)":      base64.StdEncoding.EncodeToString(priv.Seed()),
		"private (base64)":   base64.StdEncoding.EncodeToString(priv),
		"private (hex)":      hex.EncodeToString(priv),
		"openssh key (line)": pemLines[2],
	}
	check := func(where, s string) {
		t.Helper()
		for what, n := range needles {
			if strings.Contains(s, n) {
				t.Errorf("%s found in %s", what, where)
			}
		}
	}
	dom, err := j.l.DomainLookupByName(name)
	require.NoError(t, err)
	for _, f := range []libvirt.DomainXMLFlags{0, libvirt.DomainXMLInactive, libvirt.DomainXMLSecure} {
		x, err := j.l.DomainGetXMLDesc(dom, f)
		require.NoError(t, err)
		check("the domain XML", x)
	}
	stage("cleanup")
	check("the tool's output", out.String())

	// Files written since the test began, outside its TMPDIR.
	tmp, _ := filepath.EvalSymlinks(j.dir)
	home, _ := os.UserHomeDir()
	skip := map[string]bool{tmp: true, filepath.Join(home, "go"): true, filepath.Join(home, ".cache"): true,
		"/var/lib/libvirt-gci/images": true, "/var/lib/libvirt-gci/tools": true}
	scanned := 0
	for _, root := range []string{"/etc/libvirt", "/run/libvirt", "/var/lib/libvirt", "/var/log/libvirt", "/var/lib/libvirt-gci", os.TempDir(), home} {
		_ = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return nil
			}
			if d.IsDir() && skip[p] {
				return filepath.SkipDir
			}
			if !d.Type().IsRegular() {
				return nil
			}
			fi, err := d.Info()
			if err != nil || fi.ModTime().Before(start) || fi.Size() > 16<<20 {
				return nil
			}
			b, err := os.ReadFile(p)
			if err != nil {
				return nil
			}
			scanned++
			check(p, string(b))
			return nil
		})
	}
	t.Logf("scanned %d files written during the test", scanned)
	assert.NotZero(t, scanned, "libvirt at least wrote the domain's XML and log")
}

func derivePrivate(t *testing.T, secret []byte, uuid [16]byte) ed25519.PrivateKey {
	t.Helper()
	// The same derivation as guest.ClientKey, written out independently.
	mac := hmacSHA256(secret, append([]byte("libvirt-gci ssh client key v1\x00"), uuid[:]...))
	return ed25519.NewKeyFromSeed(mac)
}

func mustSigner(t *testing.T, k ed25519.PrivateKey) ssh.Signer {
	s, err := ssh.NewSignerFromKey(k)
	require.NoError(t, err)
	return s
}

func hmacSHA256(key, msg []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write(msg)
	return m.Sum(nil)
}

func xmlUnmarshal(s string, v any) error { return xml.Unmarshal([]byte(s), v) }
