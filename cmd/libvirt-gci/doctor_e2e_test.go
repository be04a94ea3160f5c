package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// doctor on the real libvirt, with both real guests offered. Not parallel: doctor checks
// every template the host offers, and other tests mark broken ones for a while.
//
// It passes; then, with the pool undefined, a template without its agent channel and a
// secret file others can read, it names each problem with its fix and exits 2; the
// fixes it prints, run as printed, make it pass again.
func TestDoctor(t *testing.T) {
	j := newJob(t)
	pool := strings.TrimSuffix(j.prefix, "-") + "-pool"
	virsh := func(args ...string) (string, error) {
		out, err := exec.Command("virsh", append([]string{"-c", testURI}, args...)...).CombinedOutput()
		return string(out), err
	}
	t.Cleanup(func() {
		_, _ = virsh("pool-destroy", pool)
		_, _ = virsh("pool-undefine", pool)
		_ = os.RemoveAll("/var/lib/libvirt/images/" + pool)
	})
	fix := func(lines, check string) string {
		m := regexp.MustCompile(`(?m)^PROBLEM ` + regexp.QuoteMeta(check) + `.*; fix: (.*)$`).FindStringSubmatch(lines)
		require.NotNil(t, m, "no problem %q in\n%s", check, lines)
		return m[1]
	}
	run := func(cmd string) {
		out, err := exec.Command("sh", "-c", cmd).CombinedOutput()
		require.NoError(t, err, "%s: %s", cmd, out)
	}
	j.env["LIBVIRT_GCI_POOL"] = pool
	j.env["LIBVIRT_GCI_RUNNER_BINARY"] = gitlabRunnerBin(t)
	tmpls := testTmpl + "," + testSystemdTmpl
	j.env["LIBVIRT_GCI_TEMPLATES"] = tmpls

	// The pool is not there yet: its fix makes it.
	r := j.stage("doctor")
	assert.Equal(t, 2, r.code, r.stdout+r.stderr)
	run(fix(r.stdout, "instance pool "+pool+": no such storage pool"))
	require.NoError(t, os.WriteFile(j.env["LIBVIRT_GCI_SECRET_FILE"], []byte(strings.Repeat("ab", 32)+"\n"), 0o600))

	r = j.stage("doctor")
	require.Equal(t, 0, r.code, r.stdout+r.stderr)
	for _, want := range []string{
		"ok      libvirt at " + testURI + ": answered in ",
		"ok      a define and undefine: ",
		"ok      instance pool " + pool + ": active, ",
		"ok      template " + testTmpl + ": 7 checks pass",
		"warm image of " + testTmpl + ": ",
		"ok      gitlab-runner for the guests (LIBVIRT_GCI_RUNNER_BINARY): " + gitlabRunnerBin(t),
		"ok      secret file (LIBVIRT_GCI_SECRET_FILE): " + j.env["LIBVIRT_GCI_SECRET_FILE"] + ": this user's, mode 0600",
	} {
		assert.Contains(t, r.stdout, want)
	}
	assert.Contains(t, r.stdout, "ok      template "+testSystemdTmpl+": 7 checks pass")
	assert.Regexp(t, `ok      network gci-dhcp: 241 addresses in its DHCP range, \d+ held now; each job gets one reserved, under the network filter libvirt-gci-job-2`, r.stdout)
	assert.NotContains(t, r.stdout, "PROBLEM")
	_, err := os.Stat("/dev/kvm")
	assert.Equal(t, err == nil, strings.Contains(r.stdout, "/dev/kvm's mode"), "/dev/kvm's mode is checked where there is one")

	// Three problems at once.
	_, err = virsh("pool-destroy", pool)
	require.NoError(t, err)
	_, err = virsh("pool-undefine", pool)
	require.NoError(t, err)
	noAgent := j.prefix + "noagent"
	j.defineTemplate(noAgent, `(?s)<channel type='unix'>.*?</channel>`, "")
	j.env["LIBVIRT_GCI_TEMPLATES"] = tmpls + "," + noAgent
	require.NoError(t, os.Chmod(j.env["LIBVIRT_GCI_SECRET_FILE"], 0o644))

	r = j.stage("doctor")
	assert.Equal(t, 2, r.code, r.stdout+r.stderr)
	assert.Contains(t, r.stderr, "doctor: 3 problem(s) found")
	assert.Contains(t, fix(r.stdout, "template "+noAgent+": checks failed: the guest agent channel"), "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>")
	assert.Contains(t, r.stdout, "has mode 0644: others can read it")
	assert.Contains(t, r.stdout, "ok      template "+testTmpl+": 7 checks pass", "the good ones are still good")

	r = j.stage("doctor", "--json")
	assert.Equal(t, 2, r.code)
	var findings []struct{ Check, Status, Detail, Fix string }
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &findings), r.stdout)
	var problems []string
	for _, f := range findings {
		if f.Status == "problem" {
			problems = append(problems, f.Check)
			assert.NotEmpty(t, f.Fix)
		}
	}
	assert.Len(t, problems, 3, "%v", problems)

	// The printed fixes, run as printed (the template's is XML to add: it goes instead).
	lines := j.stage("doctor").stdout
	run(fix(lines, "instance pool "+pool))
	run(fix(lines, "secret file (LIBVIRT_GCI_SECRET_FILE)"))
	j.env["LIBVIRT_GCI_TEMPLATES"] = tmpls
	r = j.stage("doctor")
	assert.Equal(t, 0, r.code, r.stdout+r.stderr)
}
