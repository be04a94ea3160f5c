package main

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// template check, on the test template (every check passes, and a throwaway clone
// boots), and on a domain that fails three checks, each with its hint.
func TestTemplateCheck(t *testing.T) {
	t.Parallel()
	j := newJob(t)
	r := j.stage("template", "check", "--boot", testTmpl)
	require.Equal(t, 0, r.code, r.stdout+r.stderr)
	for _, l := range strings.Split(strings.TrimSpace(r.stdout), "\n") {
		assert.True(t, strings.HasPrefix(l, "ok    "), l)
	}
	assert.Contains(t, r.stdout, "ok    the guest agent channel\n")
	assert.Regexp(t, `ok    a throwaway clone booted to a ready guest \(agent\) in \d+\.\d s`, r.stdout)
	assert.Contains(t, r.stderr, "guest agent ready after", "the boot's own progress lines")

	bad := "bad-" + j.jobID
	j.defineTemplate(bad, `(?s)<channel type='unix'>.*?</channel>`, "", `<source file='[^']+'/>`, "<source file='/nonexistent/root.qcow2'/>")
	r = j.stage("template", "check", bad)
	assert.Equal(t, 2, r.code, r.stdout+r.stderr)
	assert.Contains(t, r.stdout, "FAIL  offered to jobs (marked, or listed in LIBVIRT_GCI_TEMPLATES): libvirt-gci template mark "+bad+"\n")
	assert.Contains(t, r.stdout, "FAIL  the guest agent channel: add <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>")
	assert.Contains(t, r.stdout, "FAIL  disk vda (/nonexistent/root.qcow2, qcow2) readable by libvirt: libvirt cannot read it: ")
	assert.Contains(t, r.stdout, "ok    shut off\n")
	assert.Contains(t, r.stderr, bad+" is not usable as a template: 3 of ")
}

// agentShell runs a shell command in the guest of dom through its agent (no libvirt-gci
// involved) and returns its output.
func agentShell(t *testing.T, l *libvirt.Libvirt, dom libvirt.Domain, script string) string {
	t.Helper()
	cmd, _ := json.Marshal(map[string]any{"execute": "guest-exec", "arguments": map[string]any{"path": "/bin/sh", "arg": []string{"-c", script}, "capture-output": true}})
	out, err := l.QEMUDomainAgentCommand(dom, string(cmd), 30, 0)
	require.NoError(t, err)
	var r struct {
		Return struct{ PID int } `json:"return"`
	}
	require.NoError(t, json.Unmarshal([]byte(out[0]), &r))
	for {
		st, err := l.QEMUDomainAgentCommand(dom, fmt.Sprintf(`{"execute":"guest-exec-status","arguments":{"pid":%d}}`, r.Return.PID), 30, 0)
		require.NoError(t, err)
		var s struct {
			Return struct {
				Exited bool
				Out    string `json:"out-data"`
			} `json:"return"`
		}
		require.NoError(t, json.Unmarshal([]byte(st[0]), &s))
		if s.Return.Exited {
			b, _ := base64.StdEncoding.DecodeString(s.Return.Out)
			return string(b)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// template make on a VM prepared by hand (the test guest on a disk of its own, running,
// with a machine-id, SSH host keys, a log and a DHCP lease): it comes out shut off and
// marked, and its clones have none of these.
func TestTemplateMake(t *testing.T) {
	t.Parallel()
	j := newJob(t)
	j.env["LIBVIRT_GCI_START"] = "boot"
	disk := ownTemplateDisk(t, j)
	src := "made-" + j.jobID
	j.defineTemplate(src, `<source file='[^']+'/>`, "<source file='"+disk+"'/>")
	j.env["LIBVIRT_GCI_TEMPLATES"] = "tiny-*" // not offered by name: the mark must do it
	dom, err := j.l.DomainLookupByName(src)
	require.NoError(t, err)
	require.NoError(t, j.l.DomainCreate(dom))
	t.Cleanup(func() { _ = j.l.DomainDestroy(dom) })
	require.Eventually(t, func() bool {
		_, err := j.l.QEMUDomainAgentCommand(dom, `{"execute":"guest-ping"}`, 2, 0)
		return err == nil
	}, 3*time.Minute, 100*time.Millisecond)
	out := agentShell(t, j.l, dom, `echo 0123456789abcdef0123456789abcdef >/etc/machine-id
mkdir -p /var/lib/dhcp && echo lease >/var/lib/dhcp/dhclient.eth0.leases && echo app >/var/log/app.log
ssh-keygen -q -A; ls /etc/ssh/ssh_host_*key | wc -l; cut -d' ' -f2 /etc/ssh/ssh_host_ed25519_key.pub`)
	vmKey := strings.Fields(out)
	require.Len(t, vmKey, 2)
	require.NotEqual(t, "0", vmKey[0], "the guest has SSH host keys")

	// As the Python tool's users call it: make_base_image.sh VM... (template make for each).
	cmd := exec.Command("../../make_base_image/make_base_image.sh", src)
	cmd.Env = append(j.environ(), "LIBVIRT_GCI_BIN="+binPath)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	require.NoError(t, cmd.Run(), stderr.String())
	r := result{stderr: stderr.String()}
	assert.Contains(t, r.stderr, "reset the machine identity of "+src)
	assert.Contains(t, r.stderr, "shut "+src+" down")
	assert.Contains(t, r.stderr, "marked "+src+" as a template")
	state, _, err := j.l.DomainGetState(dom, 0)
	require.NoError(t, err)
	assert.Equal(t, libvirt.DomainShutoff, libvirt.DomainState(state))

	j.prepare()
	run := j.run("build_script", `wc -c </etc/machine-id; (ls /etc/ssh/ssh_host_*_key 2>/dev/null || true) | wc -l; (ls /var/log/app.log /var/lib/dhcp/dhclient.eth0.leases 2>/dev/null || true) | wc -l
cut -d' ' -f2 /etc/ssh/ssh_host_ed25519_key.pub`)
	require.Equal(t, 0, run.code, run.stderr)
	got := strings.Fields(run.stdout)
	require.Len(t, got, 4, run.stdout)
	assert.Equal(t, []string{"0", "1", "0"}, got[:3], "machine-id emptied; logs and leases gone; one host key, the clone's own (prepare's)")
	assert.NotEqual(t, vmKey[1], got[3], "the clone's host key is not the VM's")
	require.Equal(t, 0, j.stage("cleanup").code)

	r = j.stage("template", "make", j.instance()+"-none")
	assert.Equal(t, 2, r.code)
}
