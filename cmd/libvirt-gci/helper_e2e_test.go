package main

// End-to-end tests of the gitlab-runner helper: the binary prepare puts on every guest's
// PATH (the runner tests prove the default, the runner that drives the job).

import (
	"os/exec"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// LIBVIRT_GCI_RUNNER_BINARY names the binary: the guest runs that very one, over either
// transport, on a template with a NIC of its own too; =none gives the guest none.
func TestHelperOnThePath(t *testing.T) {
	t.Parallel()
	bin := gitlabRunnerBin(t)
	version, err := exec.Command(bin, "--version").Output()
	require.NoError(t, err)
	want, _, _ := strings.Cut(string(version), "\n")
	overEachTransport(t, func(t *testing.T, j *gitlabJob) {
		j.env["LIBVIRT_GCI_RUNNER_BINARY"] = bin
		if j.transport == "ssh" {
			j.env["CUSTOM_ENV_DISTRO"] = testNICTmpl
		}
		r := j.stage("prepare")
		require.Equal(t, 0, r.code, r.stderr)
		t.Cleanup(func() { j.stage("cleanup") })
		assert.Regexp(t, regexp.MustCompile(`set up the guest \([^)]*gitlab-runner helper on its PATH[^)]*\) in \d+ ms`), r.stderr)
		r = j.run("build_script", `gitlab-runner --version | head -1; readlink /usr/local/bin/gitlab-runner; touch /run/libvirt-gci-runner/gitlab-runner 2>/dev/null && echo writable || echo read-only`)
		require.Equal(t, 0, r.code, r.stderr)
		assert.Equal(t, want+"\n/run/libvirt-gci-runner/gitlab-runner\nread-only\n", r.stdout)
		assert.Equal(t, 0, j.stage("cleanup").code)
	})
}

func TestHelperNone(t *testing.T) {
	t.Parallel()
	j := newJob(t)
	j.env["LIBVIRT_GCI_RUNNER_BINARY"] = "none"
	j.prepare()
	r := j.run("build_script", `command -v gitlab-runner || echo "no gitlab-runner"; ls /sys/block | grep '^vd'`)
	require.Equal(t, 0, r.code, r.stderr)
	assert.Equal(t, "no gitlab-runner\nvda\n", r.stdout, "no helper, and no helper disk")
	assert.Equal(t, 0, j.stage("cleanup").code)
}
