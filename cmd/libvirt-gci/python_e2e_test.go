package main

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/libvirt-gci/libvirt-gci/cmd/libvirt-gci/internal/fakegitlab"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// baseImages makes a directory of the Python libvirt-gci's kind: NAME.qcow2 (the test
// guest's disk), and beside it the kernel and initrd that boot it (it has no bootloader).
// No domain of that name exists.
func baseImages(t *testing.T, l *libvirt.Libvirt, name string) string {
	t.Helper()
	dom, err := l.DomainLookupByName(testTmpl)
	require.NoError(t, err)
	x, err := l.DomainGetXMLDesc(dom, 0)
	require.NoError(t, err)
	disk := regexp.MustCompile(`<source file='([^']+root\.qcow2)'`).FindStringSubmatch(x)
	require.NotNil(t, disk, "the test template's disk")
	img := filepath.Dir(disk[1])
	// Under the state directory, not /tmp: QEMU runs as libvirt-qemu and must get through.
	require.NoError(t, os.MkdirAll("/var/lib/libvirt-gci", 0o755))
	dir, err := os.MkdirTemp("/var/lib/libvirt-gci", "base-images-")
	require.NoError(t, err)
	require.NoError(t, os.Chmod(dir, 0o755))
	t.Cleanup(func() { os.RemoveAll(dir) })
	for from, to := range map[string]string{"root.qcow2": ".qcow2", "vmlinuz": ".vmlinuz", "initrd.img": ".initrd"} {
		require.NoError(t, os.Symlink(filepath.Join(img, from), filepath.Join(dir, name+to)))
	}
	require.NoError(t, os.WriteFile(filepath.Join(dir, name+".cmdline"), []byte("console=ttyS0 quiet\n"), 0o644))
	return dir
}

// pythonConfig turns the README's config.toml into the Python libvirt-gci's, as its
// README gives it: no config stage, `run --script`; and, as the runner wants without a
// config stage, builds_dir and cache_dir of its own.
func pythonConfig(t *testing.T, config string) string {
	t.Helper()
	var out []string
	for _, l := range strings.Split(config, "\n") {
		switch strings.Fields(l + " x")[0] {
		case "config_exec", "config_args":
			continue
		case "run_args":
			l = `      run_args = ["run", "--script"]`
		case "executor":
			out = append(out, l, `    builds_dir = "/home/gitlab-runner/builds"`, `    cache_dir = "/home/gitlab-runner/cache"`)
			continue
		}
		out = append(out, l)
	}
	return strings.Join(out, "\n")
}

// A job the way the Python libvirt-gci runs one: its config.toml arguments, a base image
// directory and no template domain, the job's DISTRO variable choosing the image.
func TestPythonToolsUsers(t *testing.T) {
	t.Parallel()
	h := newRunnerHost(t, "agent")
	config, err := os.ReadFile(h.config)
	require.NoError(t, err)
	py := pythonConfig(t, string(config))
	require.NotContains(t, py, "config_exec")
	require.Contains(t, py, `run_args = ["run", "--script"]`)
	require.NoError(t, os.WriteFile(h.config, []byte(py), 0o600))

	const distro = "tinypy-12"
	dir := baseImages(t, h.l, distro)
	var env []string
	for _, kv := range h.env { // the base images are the only templates
		if !strings.HasPrefix(kv, "LIBVIRT_GCI_TEMPLATES=") && !strings.HasPrefix(kv, "LIBVIRT_GCI_DEFAULT_TEMPLATE=") {
			env = append(env, kv)
		}
	}
	h.env = append(env, "LIBVIRT_GCI_BASE_IMAGES="+dir, "LIBVIRT_GCI_BASE_CPUS=1", "LIBVIRT_GCI_BASE_MEMORY=256M",
		"LIBVIRT_GCI_BASE_NETWORK=gci-isolated", "LIBVIRT_GCI_BASE_VIRT=qemu") // this host's /dev/kvm cannot run a guest

	ok := h.gl.Add(fakegitlab.JobSpec{
		Script:    []string{`echo "distro=$DISTRO on $(cat /proc/cmdline)"`, `ls /sys/class/net | tr '\n' ' '; echo`, `echo "pwd=$PWD"`},
		Variables: map[string]string{"DISTRO": distro},
	})
	missing := h.gl.Add(fakegitlab.JobSpec{Script: []string{"echo never"}, Variables: map[string]string{"DISTRO": "fedora-34"}})
	start := time.Now()
	p := h.runSingle(2)
	final, trace := h.finish(ok)
	t.Logf("a job from a base image: %.1f s", time.Since(start).Seconds())
	assert.Equal(t, "success", final.State, trace)
	assert.True(t, fakegitlab.HasLine(trace, "distro="+distro+" on console=ttyS0 quiet"), trace)
	assert.Regexp(t, `(?m)eth0 .*lo|enp\S+ .*lo`, trace, "the built-in definition's NIC")
	assert.Contains(t, trace, "pwd=/home/gitlab-runner/builds/")

	final, trace = h.finish(missing)
	p.wait(t, time.Minute)
	assert.Equal(t, "failed", final.State, trace)
	assert.Contains(t, trace, `template "fedora-34" (from CUSTOM_ENV_DISTRO) is not offered on this runner`)
	assert.Contains(t, trace, "no base image fedora-34.qcow2 in LIBVIRT_GCI_BASE_IMAGES")
	assert.NotContains(t, trace, dir, "the job's log does not learn the host's directory")
	assert.Empty(t, leftovers(t, h.l, h.prefix))
}

// Base images in a storage pool instead of a directory: run by hand, the way the Python
// tool's README shows (prepare --distro, cleanup --machine).
func TestBaseImagesInAPool(t *testing.T) {
	t.Parallel()
	j := newJob(t)
	const distro = "tinypool-12"
	dir := baseImages(t, j.l, distro)
	pool := strings.TrimSuffix(j.prefix, "-") + "-base"
	p, err := j.l.StoragePoolCreateXML(fmt.Sprintf("<pool type='dir'><name>%s</name><target><path>%s</path></target></pool>", pool, dir), 0)
	require.NoError(t, err)
	t.Cleanup(func() { _ = j.l.StoragePoolDestroy(p) })
	delete(j.env, "LIBVIRT_GCI_TEMPLATES")
	j.env["LIBVIRT_GCI_BASE_IMAGES"] = pool
	j.env["LIBVIRT_GCI_BASE_CPUS"] = "1"
	j.env["LIBVIRT_GCI_BASE_MEMORY"] = "256M"
	j.env["LIBVIRT_GCI_BASE_NETWORK"] = "none"
	j.env["LIBVIRT_GCI_BASE_VIRT"] = "qemu"
	r := j.stage("template", "list")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Regexp(t, `(?m)^`+distro+`\s+base image\s+yes \(in LIBVIRT_GCI_BASE_IMAGES\)$`, r.stdout)
	r = j.stage("template", "check", distro)
	require.Equal(t, 0, r.code, r.stdout+r.stderr)
	assert.Contains(t, r.stdout, "ok    a base image "+distro+".qcow2 in "+pool)
	assert.Contains(t, r.stdout, "ok    the guest agent channel")
	r = j.stage("template", "check", "fedora-34")
	assert.Equal(t, 2, r.code)
	assert.Contains(t, r.stdout, "FAIL  a libvirt domain, or a base image fedora-34.qcow2 in "+pool)

	name := j.prefix + "by-hand"
	r = j.stage("prepare", "--distro", distro, "--machine", name)
	require.Equal(t, 0, r.code, r.stderr)
	r = j.stage("run", "--machine", name, j.script("x.sh", "echo from-pool; cat /proc/cmdline; ls /sys/class/net | tr '\\n' ' '"))
	require.Equal(t, 0, r.code, r.stderr)
	assert.Contains(t, r.stdout, "from-pool")
	assert.Contains(t, r.stdout, "console=ttyS0", "a pool's image boots with the default command line")
	assert.NotContains(t, r.stdout, "eth0", "LIBVIRT_GCI_BASE_NETWORK=none: no NIC")
	r = j.stage("cleanup", "--machine", name)
	require.Equal(t, 0, r.code, r.stderr)

	r = j.stage("prepare", "--distro", "../"+distro, "--machine", name)
	assert.Equal(t, 2, r.code, r.stderr) // the operator's flag: not a job's failure
	assert.Contains(t, r.stderr, `template name "../tinypool-12" is invalid`)
	assert.Empty(t, leftovers(t, j.l, j.prefix))
}
