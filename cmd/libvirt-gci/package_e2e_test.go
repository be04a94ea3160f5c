package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The Debian package on this machine, as an operator uses it: `make deb` builds one that
// installs (binary and its version, man page, completion, gc service and timer enabled,
// the runner's drop-in, the settings file), upgrades over an older build keeping the
// operator's settings, runs the gc service's commands with those settings, and removes
// and purges cleanly. `make install` installs the same files without a package.
func TestDebianPackage(t *testing.T) {
	t.Parallel()
	lv(t) // a real-VM suite test: needs root and this machine, as the others
	if out, err := exec.Command("dpkg-query", "-W", "-f", "${Status} ${Version}", "libvirt-gci").Output(); err == nil && strings.HasPrefix(string(out), "install ok") {
		t.Fatalf("libvirt-gci is installed on this machine (%s): this test installs and removes its own builds; remove it first", out)
	}
	root, err := filepath.Abs("../..")
	require.NoError(t, err)
	sh := func(cmd string) string {
		t.Helper()
		c := exec.Command("bash", "-c", cmd)
		c.Dir = root
		out, err := c.CombinedOutput()
		require.NoError(t, err, "%s:\n%s", cmd, out)
		return string(out)
	}
	t.Cleanup(func() { _ = exec.Command("dpkg", "--purge", "libvirt-gci").Run() })
	debs := map[string]string{}
	for _, v := range []string{"0~e2e.1", "0~e2e.2"} {
		out := sh("make -s deb DEB_VERSION=" + v)
		debs[v] = filepath.Join(root, strings.TrimSpace(out[strings.LastIndex(strings.TrimSpace(out), "\n")+1:]))
		require.FileExists(t, debs[v])
		t.Cleanup(func() { _ = os.Remove(debs[v]) })
	}

	assert.Contains(t, sh("dpkg-deb -c "+debs["0~e2e.1"]), "./usr/share/man/man1/libvirt-gci.1.gz")
	sh("dpkg -i " + debs["0~e2e.1"])
	assert.Contains(t, sh("/usr/bin/libvirt-gci --version"), "0~e2e.1")
	// Minimal images (Docker's Debian) tell dpkg to leave out man pages: there, the
	// page is in the package (above), not on the disk.
	if exec.Command("sh", "-c", "grep -qs '^path-exclude=/usr/share/man' /etc/dpkg/dpkg.cfg.d/*").Run() != nil {
		assert.Equal(t, "/usr/share/man/man1/libvirt-gci.1.gz\n", sh("man -w libvirt-gci"))
		page := sh("MANWIDTH=200 man -P cat libvirt-gci")
		for _, cmd := range []string{"doctor", "metrics", "prepare", "cleanup", "LIBVIRT_GCI_MAX_INSTANCES"} {
			assert.Contains(t, page, cmd, "the man page, made from the CLI's help")
		}
	}
	assert.Contains(t, sh("bash -c '. /usr/share/bash-completion/completions/libvirt-gci; complete -p libvirt-gci'"), "-F _libvirt_gci")
	words := sh("/usr/bin/libvirt-gci doctor - --generate-bash-completion")
	assert.Contains(t, words, "--boot", "what the completion asks the binary")
	for _, f := range []string{"/lib/systemd/system/libvirt-gci-gc.service", "/lib/systemd/system/libvirt-gci-gc.timer",
		"/lib/systemd/system/gitlab-runner.service.d/libvirt-gci.conf", "/etc/default/libvirt-gci"} {
		assert.FileExists(t, f)
	}
	assert.FileExists(t, "/etc/systemd/system/timers.target.wants/libvirt-gci-gc.timer", "the timer enabled at install")
	assert.Contains(t, sh("cat /lib/systemd/system/gitlab-runner.service.d/libvirt-gci.conf"), "EnvironmentFile=-/etc/default/libvirt-gci")

	// The operator's settings survive an upgrade.
	sh(`sed -i 's|^#LIBVIRT_GCI_PREFIX=.*|LIBVIRT_GCI_PREFIX=` + "e2e-pkg-" + `|; s|^#LIBVIRT_GCI_METRICS_FILE=.*|LIBVIRT_GCI_METRICS_FILE=` + t.TempDir() + `/libvirt-gci.prom|' /etc/default/libvirt-gci`)
	sh("dpkg -i " + debs["0~e2e.2"])
	assert.Contains(t, sh("/usr/bin/libvirt-gci --version"), "0~e2e.2")
	settings := sh("cat /etc/default/libvirt-gci")
	assert.Contains(t, settings, "\nLIBVIRT_GCI_PREFIX=e2e-pkg-\n")
	assert.FileExists(t, "/etc/systemd/system/timers.target.wants/libvirt-gci-gc.timer", "still enabled")

	// The gc service's commands, as systemd runs them: with the settings file, $$ as $.
	var execs []string
	for _, l := range strings.Split(sh("cat /lib/systemd/system/libvirt-gci-gc.service"), "\n") {
		if c, ok := strings.CutPrefix(l, "ExecStart="); ok {
			execs = append(execs, strings.ReplaceAll(c, "$$", "$"))
		}
	}
	require.Len(t, execs, 2)
	assert.Equal(t, "/usr/bin/libvirt-gci gc", execs[0])
	env := "set -a; . /etc/default/libvirt-gci; set +a; export LIBVIRT_GCI_URI=" + testURI + " LIBVIRT_GCI_POOL=" + testPool + "; "
	assert.Contains(t, sh(env+execs[0]+" --dry-run"), "gc: 0 to remove", "gc with the file's prefix, which no instance has")
	sh(env + execs[1])
	prom := strings.TrimPrefix(strings.Split(settings[strings.Index(settings, "\nLIBVIRT_GCI_METRICS_FILE=")+1:], "\n")[0], "LIBVIRT_GCI_METRICS_FILE=")
	b, err := os.ReadFile(prom)
	require.NoError(t, err, "the metrics file the service writes")
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(bytes.NewReader(b))
	require.NoError(t, err)
	assert.Contains(t, mfs, "libvirt_gci_up")

	// Removed: its files go, the operator's settings stay; purged: they go too.
	// The package's files (its listing, not dpkg's: that leaves out what dpkg excludes).
	var installed []string
	for _, l := range strings.Split(sh("dpkg-deb -c "+debs["0~e2e.2"]), "\n") {
		if f := strings.Fields(l); len(f) == 6 && strings.HasPrefix(f[0], "-") {
			installed = append(installed, strings.TrimPrefix(f[5], "."))
		}
	}
	sh("dpkg -r libvirt-gci")
	assert.NoFileExists(t, "/usr/bin/libvirt-gci")
	assert.NoFileExists(t, "/usr/share/man/man1/libvirt-gci.1.gz")
	assert.NoFileExists(t, "/lib/systemd/system/libvirt-gci-gc.timer")
	assert.FileExists(t, "/etc/default/libvirt-gci", "a conffile stays until purge")
	sh("dpkg -P libvirt-gci")
	assert.NoFileExists(t, "/etc/default/libvirt-gci")
	assert.NoFileExists(t, "/etc/systemd/system/timers.target.wants/libvirt-gci-gc.timer")
	_, err = os.Lstat("/etc/systemd/system/libvirt-gci-gc.timer")
	assert.True(t, os.IsNotExist(err), "no mask left")
	out, _ := exec.Command("dpkg-query", "-W", "libvirt-gci").CombinedOutput()
	assert.Contains(t, string(out), "no packages found matching libvirt-gci")

	// make install: the package's files, without a package.
	dest := t.TempDir()
	sh("make -s install DESTDIR=" + dest + " PREFIX=/usr UNITDIR=/lib/systemd/system")
	var files []string
	require.NoError(t, filepath.Walk(dest, func(p string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() {
			files = append(files, strings.TrimPrefix(p, dest))
		}
		return err
	}))
	var want []string
	for _, f := range installed {
		if f != "/usr/share/doc/libvirt-gci/copyright" {
			want = append(want, f)
		}
	}
	slices.Sort(files)
	slices.Sort(want)
	assert.Equal(t, want, files)
}
