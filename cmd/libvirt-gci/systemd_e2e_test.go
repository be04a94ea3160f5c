package main

// The systemd guest (make_base_image/debian): what users run. Debian with systemd as PID
// 1, udev, D-Bus, the distro's kernel and initramfs, systemd-networkd with DHCP on a
// libvirt network of the tests' own (dnsmasq, no forward), qemu-guest-agent and sshd as
// Debian's units, an empty machine-id and host keys made at first boot. Each user-visible
// behaviour proven on the tiny guest is proven here too: cold boot and restore over both
// transports, clones restored at once, the real runner with sources, cache and
// artifacts, template make, keep-failed.

import (
	"bytes"
	"net/url"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/libvirt-gci/libvirt-gci/cmd/libvirt-gci/internal/fakegitlab"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

var testSystemdTmpl = envOr("LIBVIRT_GCI_TEST_SYSTEMD_TEMPLATE", "debian-bookworm")

// newSystemdJob is a job on the systemd guest, over transport.
func newSystemdJob(t testing.TB, transport string) *gitlabJob {
	t.Helper()
	j := newJobOver(t, transport)
	if _, err := j.l.DomainLookupByName(testSystemdTmpl); err != nil {
		t.Fatalf("no template %q (scripts/testenv.sh setup defines it): %v", testSystemdTmpl, err)
	}
	j.env["CUSTOM_ENV_DISTRO"] = testSystemdTmpl
	j.env["LIBVIRT_GCI_TEMPLATES"] = "tiny-*," + testSystemdTmpl
	j.env["LIBVIRT_GCI_BOOT_TIMEOUT"] = "5m"
	j.env["LIBVIRT_GCI_RUNNER_BINARY"] = "none"
	return j
}

// systemdIdentity is a job's first stage on the systemd guest: what the job sees of its
// machine. The template's NIC is the one not on the ssh NIC's 10.213.213.0/24.
const systemdIdentity = `echo "state=$(systemctl is-system-running)"
echo "addr=$(ip -4 -o addr show scope global | awk '$4 !~ /^10\.213\.213\./ {print $4}' | head -1)"
echo "host=$(hostname)"
echo "hostnamectl=$(hostnamectl hostname)"
echo "machine-id=$(cat /etc/machine-id)"
echo "systemd-machine-id=$(busctl call org.freedesktop.systemd1 /org/freedesktop/systemd1 org.freedesktop.DBus.Peer GetMachineId | cut -d'"' -f2)"
echo "boot-log=$(journalctl -b -k -q --no-pager | grep -c 'Linux version')"
marker=gci-marker-$$-$(date +%s%N)
logger -t gci-test "$marker"
for i in $(seq 50); do journalctl -b -q --no-pager -t gci-test | grep -q "$marker" && break; sleep 0.2; done
echo "journal-marker=$(journalctl -b -q --no-pager -t gci-test | grep -c "$marker")"
echo "journal-machine=$(journalctl -b -t gci-test -o export --no-pager | sed -n 's/^_MACHINE_ID=//p' | tail -1)"
echo "hostkey=$(cut -d' ' -f2 /etc/ssh/ssh_host_ed25519_key.pub)"
echo "sshd-key=$(ssh-keyscan -t ed25519 127.0.0.1 2>/dev/null | awk '{print $3}')"
echo "keys=$(ls /etc/ssh/ssh_host_*_key | wc -l)"`

// checkSystemdIdentity checks what a clone's first stage saw: a finished boot, the
// template's NIC addressed, the instance's host name, the clone's own journal, and
// sshd serving the clone's own host key.
func checkSystemdIdentity(t *testing.T, name string, g map[string]string) {
	t.Helper()
	assert.Equal(t, "running", g["state"], "%s: systemd's boot is over", name)
	assert.Regexp(t, `^10\.213\.214\.\d+/24$`, g["addr"], "%s: the template's NIC has its DHCP address in the first stage", name)
	assert.Equal(t, name, g["host"])
	assert.Equal(t, name, g["hostnamectl"], "hostnamed agrees with the kernel")
	assert.Regexp(t, `^[0-9a-f]{32}$`, g["machine-id"])
	assert.Equal(t, g["machine-id"], g["systemd-machine-id"], "systemd reports the clone's machine-id")
	assert.Equal(t, "1", g["boot-log"], "journalctl -b shows this boot's log, the kernel's lines included")
	assert.Equal(t, "1", g["journal-marker"], "journald writes, and journalctl shows, the clone's own entries")
	assert.Equal(t, g["machine-id"], g["journal-machine"], "under the clone's machine-id")
	assert.NotEmpty(t, g["hostkey"])
	assert.Equal(t, g["hostkey"], g["sshd-key"], "sshd serves the clone's own host key")
	assert.Equal(t, "1", g["keys"], "no host key of the template's is left")
}

// assertAllDiffer checks that no two clones share any of keys.
func assertAllDiffer(t *testing.T, got []map[string]string, keys ...string) {
	t.Helper()
	for _, k := range keys {
		seen := map[string]int{}
		for i, g := range got {
			if j, ok := seen[g[k]]; ok {
				t.Errorf("clones %d and %d share their %s (%s)", j, i, k, g[k])
			}
			seen[g[k]] = i
		}
	}
}

// Three clones restored at once from warm images of the systemd guest, two over ssh (one
// warm image) and one over the agent (another): each is its own machine, as a job sees it.
func TestSystemdRestoredClones(t *testing.T) {
	t.Parallel()
	jobs := []*gitlabJob{newSystemdJob(t, "ssh"), newSystemdJob(t, "ssh"), newSystemdJob(t, "agent")}
	var wg sync.WaitGroup
	for _, j := range []*gitlabJob{jobs[0], jobs[2]} { // one warm image per transport, made at once
		wg.Add(1)
		go func() { defer wg.Done(); j.warm() }()
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	prepared := make([]result, len(jobs))
	for i, j := range jobs {
		wg.Add(1)
		go func() { defer wg.Done(); prepared[i] = j.stage("prepare") }()
	}
	wg.Wait()
	for _, j := range jobs {
		j.t.Cleanup(func() { j.stage("cleanup") })
	}
	got := make([]map[string]string, len(jobs))
	for i, j := range jobs {
		require.Equal(t, 0, prepared[i].code, prepared[i].stderr)
		name := j.instance()
		assert.Contains(t, prepared[i].stderr, "restored "+testSystemdTmpl+" into "+name)
		assert.Regexp(t, `network ready after [0-9.]+ s more: \S+ 10\.213\.214\.\d+/24 on network gci-dhcp`, prepared[i].stderr)
		// The warm image was saved with systemd running: its clones are not waited for.
		assert.Contains(t, prepared[i].stderr, "systemd running since the warm image's save; not waited for again")
		r := j.run("build_script", systemdIdentity)
		require.Equal(t, 0, r.code, r.stderr)
		t.Logf("%s (%s):\n%s", name, j.transport, r.stdout)
		got[i] = keyValues(r.stdout)
		checkSystemdIdentity(t, name, got[i])
	}
	assertAllDiffer(t, got, "host", "machine-id", "addr", "hostkey")
}

// A cold-booted clone of the systemd guest over ssh: the same machine as a restored one,
// the instance's host name included, and its NIC addressed in the first stage. (A cold
// boot over the agent is TestSystemdTemplateMake's clone: a cold boot is the systemd
// guest's dearest case here, half a minute of emulated CPU, so each is made to count.)
func TestSystemdColdBoot(t *testing.T) {
	t.Parallel()
	j := newSystemdJob(t, "ssh")
	j.env["LIBVIRT_GCI_START"] = "boot"
	r := j.stage("prepare")
	require.Equal(t, 0, r.code, "prepare failed:\n%s", r.stderr)
	j.t.Cleanup(func() { j.stage("cleanup") })
	assert.Contains(t, r.stderr, "cloned "+testSystemdTmpl+" into "+j.instance())
	assert.Contains(t, r.stderr, "systemd running after")
	assert.Regexp(t, `network ready after [0-9.]+ s more: \S+ 10\.213\.214\.\d+/24 on network gci-dhcp`, r.stderr)
	run := j.run("build_script", systemdIdentity)
	require.Equal(t, 0, run.code, run.stderr)
	t.Logf("%s:\n%s", j.instance(), run.stdout)
	checkSystemdIdentity(t, j.instance(), keyValues(run.stdout))
}

// The real gitlab-runner runs a pipeline job on the systemd guest over each transport:
// its sources cloned in the guest, a cache saved, artifacts uploaded. The VM is restored,
// its cache share attached after the restore.
func TestSystemdRunnerPipeline(t *testing.T) {
	t.Parallel()
	for _, tr := range transports {
		t.Run(tr, func(t *testing.T) {
			t.Parallel()
			h := newRunnerHost(t, tr)
			u, err := url.Parse(h.gl.URL())
			require.NoError(t, err)
			caches := cacheDir(t)
			h.env = append(h.env, "LIBVIRT_GCI_GUEST_FORWARDS="+u.Host, "LIBVIRT_GCI_CACHE_DIR="+caches,
				"LIBVIRT_GCI_TEMPLATES=tiny-*,"+testSystemdTmpl, "LIBVIRT_GCI_DEFAULT_TEMPLATE="+testSystemdTmpl, "LIBVIRT_GCI_BOOT_TIMEOUT=5m")
			job := h.gl.Add(fakegitlab.JobSpec{Fetch: true,
				Script: []string{`cp src/greeting.txt out.txt`, `git log --oneline | head -1`, `mkdir -p vendor && hostname >vendor/marker`,
					`echo "first-stage-addr=$(ip -4 -o addr show scope global | awk '$4 ~ /^10\.213\.214\./ {print $4}')"`},
				Cache:     []map[string]any{{"key": "deps", "paths": []string{"vendor/"}, "policy": "push", "when": "on_success", "untracked": false}},
				Artifacts: []map[string]any{{"name": "out", "paths": []string{"out.txt"}, "when": "on_success", "artifact_type": "archive", "artifact_format": "zip"}},
			})
			p := h.runSingle(1)
			final, trace := h.finish(job)
			require.Equal(t, "success", final.State, trace)
			p.wait(t, time.Minute)
			assert.Regexp(t, `systemd running (after|since the warm image's save)`, trace)
			// (Both transports want the one warm image: the one not making it may boot.)
			assert.Regexp(t, `restored \S+ into \S+ from \S+ in \d+ ms .*cache share attached in \d+ ms|another prepare is making the warm image`, trace)
			assert.Contains(t, trace, "Created cache")
			for m, opts := range mountsBelow(t, caches) { // the share: a file system of its own
				assert.True(t, strings.HasSuffix(m, "/unprotected"), m)
				assert.Contains(t, opts, "nosuid,nodev", m)
			}
			assert.Contains(t, trace, "Uploading artifacts")
			assert.Regexp(t, `first-stage-addr=10\.213\.214\.\d+/24`, trace)
			assert.NotEmpty(t, h.gl.Artifacts(job))
			assert.Empty(t, leftovers(t, h.l, h.prefix))
		})
	}
}

// template make on a running systemd VM: a clone of the result boots with a machine-id
// and host keys of its own, not the VM's.
func TestSystemdTemplateMake(t *testing.T) {
	t.Parallel()
	j := newSystemdJob(t, "agent")
	j.env["LIBVIRT_GCI_START"] = "boot"
	disk := ownTemplateDisk(t, j, testSystemdTmpl)
	src := "made-sd-" + j.jobID
	x := templateVariantOf(t, j.l, testSystemdTmpl, src, `<source file='[^']+'/>`, "<source file='"+disk+"'/>")
	dom, err := j.l.DomainDefineXMLFlags(x, 0)
	require.NoError(t, err)
	t.Cleanup(func() { _ = j.l.DomainUndefine(dom) })
	j.env["CUSTOM_ENV_DISTRO"] = src
	j.env["LIBVIRT_GCI_TEMPLATES"] = "tiny-*" // not offered by name: the mark must do it
	require.NoError(t, j.l.DomainCreate(dom))
	t.Cleanup(func() { _ = j.l.DomainDestroy(dom) })
	require.Eventually(t, func() bool {
		_, err := j.l.QEMUDomainAgentCommand(dom, `{"execute":"guest-ping"}`, 2, 0)
		return err == nil
	}, 4*time.Minute, 200*time.Millisecond)
	before := keyValues(agentShell(t, j.l, dom, `systemctl is-system-running --wait >/dev/null
echo "machine-id=$(cat /etc/machine-id)"
echo "hostkey=$(cut -d' ' -f2 /etc/ssh/ssh_host_ed25519_key.pub)"`))
	require.Regexp(t, `^[0-9a-f]{32}$`, before["machine-id"])
	require.NotEmpty(t, before["hostkey"])

	cmd := exec.Command(binPath, "template", "make", src)
	cmd.Env = j.environ()
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	require.NoError(t, cmd.Run(), stderr.String())
	assert.Contains(t, stderr.String(), "marked "+src+" as a template")
	state, _, err := j.l.DomainGetState(dom, 0)
	require.NoError(t, err)
	assert.Equal(t, libvirt.DomainShutoff, libvirt.DomainState(state))

	j.prepare()
	r := j.run("build_script", systemdIdentity)
	require.Equal(t, 0, r.code, r.stderr)
	g := keyValues(r.stdout)
	checkSystemdIdentity(t, j.instance(), g)
	assert.NotEqual(t, before["machine-id"], g["machine-id"], "the clone has a machine-id of its own")
	assert.NotEqual(t, before["hostkey"], g["hostkey"], "the clone has a host key of its own")
	require.Equal(t, 0, j.stage("cleanup").code)
}

// Keep-failed on the systemd guest: the failed job's VM stays, stopped (the service the
// job started is not running), its disks kept; cleanup --machine removes it.
func TestSystemdKeepFailed(t *testing.T) {
	t.Parallel()
	j := newSystemdJob(t, "agent")
	j.env["LIBVIRT_GCI_KEEP_FAILED"] = "1h"
	j.warm()
	j.prepare()
	name := j.instance()
	r := j.run("build_script", `systemd-run --unit=gci-lingers sh -c 'while :; do date >>/root/alive; sleep 1; done'
echo failing on purpose; exit 3`)
	require.Equal(t, 1, r.code, r.stderr)
	c := j.stage("cleanup")
	require.Equal(t, 0, c.code, c.stderr)
	assert.Contains(t, c.stderr, "kept "+name+" after the failed job until ")
	x := assertDisarmed(t, j.l, name, "the unit the job left no longer runs")
	assert.Contains(t, x, "<interface ", "the systemd template's NIC, down")
	assert.Contains(t, x, "<disk", "its disks stay, for a look")
	d := j.stage("cleanup", "--machine", name)
	require.Equal(t, 0, d.code, d.stderr)
	_, err := j.l.DomainLookupByName(name)
	assert.Error(t, err, "cleanup --machine removed it")
	assert.Empty(t, leftovers(t, j.l, j.prefix))
}
