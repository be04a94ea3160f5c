package executor

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/libvirt-gci/libvirt-gci/provision"
	"github.com/libvirt-gci/libvirt-gci/provision/provisiontest"
)

// doctorJob is a fake host that doctor passes: its secret file in order, no helper, the
// template offered, its warm image made by a first job.
func doctorJob(t *testing.T) *fakeJob {
	t.Helper()
	j := newFakeJob(t)
	j.e.Settings.RunnerBinary = "none"
	j.e.Settings.SecretFile = filepath.Join(t.TempDir(), "secret")
	require.NoError(t, j.stages())
	j.out.Reset()
	return j
}

// doctor runs Doctor and returns its lines and its findings (from --json).
func doctor(t *testing.T, j *fakeJob) (string, []provision.Finding, error) {
	t.Helper()
	j.out.Reset()
	err := j.e.Doctor(context.Background(), false, false)
	lines := j.out.String()
	j.out.Reset()
	jerr := j.e.Doctor(context.Background(), false, true)
	assert.Equal(t, err == nil, jerr == nil, "--json agrees")
	var fs []provision.Finding
	require.NoError(t, json.Unmarshal(j.out.Bytes(), &fs), j.out.String())
	return lines, fs, err
}

func TestDoctorPasses(t *testing.T) {
	j := doctorJob(t)
	lines, fs, err := doctor(t, j)
	require.NoError(t, err, lines)
	assert.Contains(t, lines, "ok      libvirt at qemu:///system: answered in")
	assert.Contains(t, lines, "ok      a define and undefine:")
	assert.Contains(t, lines, "NOTE    KVM: libvirt does not offer it")
	assert.Contains(t, lines, "ok      instance pool ci: active, 100 GiB free of 100 GiB; a job's disks grow to 1 GiB at most (tmpl)")
	assert.Contains(t, lines, "ok      template tmpl: 7 checks pass")
	assert.Regexp(t, `ok      warm image of tmpl: libvirt-gci-warm-\S+ is up to date`, lines)
	assert.Contains(t, lines, "NOTE    gitlab-runner for the guests (LIBVIRT_GCI_RUNNER_BINARY): none")
	assert.Contains(t, lines, "NOTE    capacity: no limit")
	for _, f := range fs {
		assert.NotEqual(t, provision.FindingProblem, f.Status, "%+v", f)
	}
	assert.Empty(t, j.leftovers(), "doctor's define probe leaves nothing")

	// Without a first job, the warm image is not there: the first job will wait for it.
	j = newFakeJob(t)
	j.e.Settings.RunnerBinary = "none"
	j.e.Settings.SecretFile = filepath.Join(t.TempDir(), "secret")
	lines, _, err = doctor(t, j)
	require.NoError(t, err, lines)
	assert.Contains(t, lines, "NOTE    warm image of tmpl: not made yet: the first job of tmpl waits a cold boot")
	assert.Contains(t, lines, "(make it now: libvirt-gci template warm tmpl)")
	assert.Contains(t, lines, "ok      secret file (LIBVIRT_GCI_SECRET_FILE): "+j.e.Settings.SecretFile+" is not there yet")

	// --boot boots a throwaway clone of each template, removes it, and says how long
	// the first job will wait for the warm image.
	j.out.Reset()
	require.NoError(t, j.e.Doctor(context.Background(), true, false))
	assert.Regexp(t, `ok      a clone of tmpl boots: to a ready guest in \d+\.\d s`, j.out.String())
	assert.Regexp(t, `NOTE    warm image of tmpl: not made yet: the first job of tmpl waits about \d+ s: a cold boot \(\d+\.\d s here\) and a save`, j.out.String())
	assert.Empty(t, j.leftovers(), "the clone is gone")
}

// The acceptance's three problems at once: the pool undefined, a template without its
// agent channel, a secret file others can read; each named with its fix, and a system
// failure (exit 2 outside the runner).
func TestDoctorNamesEachProblem(t *testing.T) {
	j := doctorJob(t)
	noAgent := strings.Replace(strings.Replace(provisiontest.Template, "<name>tmpl</name>", "<name>tmpl-noagent</name>", 1),
		"<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>", "", 1)
	_, err := j.f.DomainDefineXMLFlags(noAgent, 0)
	require.NoError(t, err)
	j.e.Settings.Templates = append(j.e.Settings.Templates, "tmpl-noagent")
	j.e.Settings.Pool = "gone"
	require.NoError(t, os.WriteFile(j.e.Settings.SecretFile, []byte(strings.Repeat("ab", 32)+"\n"), 0o644))
	require.NoError(t, os.Chmod(j.e.Settings.SecretFile, 0o644))

	lines, fs, err := doctor(t, j)
	var df *DoctorFailed
	require.ErrorAs(t, err, &df, lines)
	assert.Equal(t, 3, df.Problems, lines)
	assert.Equal(t, 2, ExitCode(err, ExitCodes{Build: 1, System: 2}))
	assert.Contains(t, lines, "PROBLEM instance pool gone: no such storage pool (LIBVIRT_GCI_POOL); fix: virsh pool-define-as gone dir")
	assert.Contains(t, lines, "PROBLEM template tmpl-noagent: checks failed: the guest agent channel; fix: add <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>")
	assert.Contains(t, lines, "PROBLEM secret file (LIBVIRT_GCI_SECRET_FILE): secret file "+j.e.Settings.SecretFile+" has mode 0644")
	assert.Contains(t, lines, "others can read it")
	assert.Contains(t, lines, "fix: chown")
	assert.Contains(t, lines, "ok      template tmpl: 7 checks pass", "the good template is still said to be good")
	problems := 0
	for _, f := range fs {
		if f.Status == provision.FindingProblem {
			problems++
			assert.NotEmpty(t, f.Fix, "%+v", f)
		}
	}
	assert.Equal(t, 3, problems)
}

// The settings' own checks: the runner's helper, the capacity against the host (the
// fake's: 32 GiB, 8 CPUs), the cache directory, virtiofsd.
func TestDoctorSettings(t *testing.T) {
	j := doctorJob(t)
	j.e.Settings.RunnerBinary = filepath.Join(t.TempDir(), "gitlab-runner")
	j.e.Settings.Limits.MemoryTotal = 64 << 30
	j.e.Settings.MaxCPUs = 16
	lines, _, err := doctor(t, j)
	assert.Error(t, err)
	assert.Contains(t, lines, "PROBLEM gitlab-runner for the guests (LIBVIRT_GCI_RUNNER_BINARY): "+j.e.Settings.RunnerBinary+": stat")
	assert.Contains(t, lines, "PROBLEM capacity: LIBVIRT_GCI_MAX_MEMORY_TOTAL 64 GiB is more than the host's memory, 32 GiB")
	assert.Contains(t, lines, "PROBLEM job sizes: LIBVIRT_GCI_MAX_CPUS=16 is more than the host's 8 CPUs")

	require.NoError(t, os.WriteFile(j.e.Settings.RunnerBinary, []byte("#!/bin/sh\n"), 0o755))
	j.e.Settings.Limits = provision.Limits{Instances: 200}
	j.e.Settings.MaxCPUs = 0
	lines, _, _ = doctor(t, j)
	assert.Contains(t, lines, "ok      gitlab-runner for the guests (LIBVIRT_GCI_RUNNER_BINARY): "+j.e.Settings.RunnerBinary)
	assert.Contains(t, lines, "PROBLEM capacity: LIBVIRT_GCI_MAX_INSTANCES=200 instances of even the smallest template (256 MiB) need 50 GiB; the host has 32 GiB")
	j.e.Settings.Limits = provision.Limits{Instances: 4}
	lines, _, _ = doctor(t, j)
	assert.Contains(t, lines, "ok      capacity: limits fit the host (32 GiB, 8 CPUs)")

	// With several hosts, each host's line says whose it is.
	j.e.Settings.URI = "qemu:///system test:///other"
	lines, _, _ = doctor(t, j)
	assert.Contains(t, lines, "ok      qemu:///system: template tmpl: 7 checks pass")
	assert.Contains(t, lines, "ok      test:///other: template tmpl: 7 checks pass")
	j.e.Settings.URI = "qemu:///system"

	if os.Geteuid() == 0 {
		dir := t.TempDir()
		require.NoError(t, os.Chmod(dir, 0o777))
		j.e.Settings.CacheDir = dir
		lines, _, _ = doctor(t, j)
		assert.Contains(t, lines, "PROBLEM cache directory (LIBVIRT_GCI_CACHE_DIR): LIBVIRT_GCI_CACHE_DIR "+dir+" is writable by its group or others")
		assert.Contains(t, lines, "virtiofsd (LIBVIRT_GCI_CACHE_DIR is set)")
	}
}

// A misspelt setting in the environment is a problem (the setting silently keeps its
// default); another LIBVIRT_GCI_* variable is a note.
func TestDoctorEnviron(t *testing.T) {
	t.Parallel()
	fs := doctorEnviron([]string{"PATH=/bin", "LIBVIRT_GCI_POOL=ci", "LIBVIRT_GCI_MAX_INSTANCE=4", "LIBVIRT_GCI_METRICS_FILE=/x.prom", "LIBVIRT_GCI_TEST_TEMPLATE=tiny"})
	require.Len(t, fs, 2)
	assert.Equal(t, provision.Finding{Check: "settings", Status: provision.FindingProblem,
		Detail: "LIBVIRT_GCI_MAX_INSTANCE is not a setting, so LIBVIRT_GCI_MAX_INSTANCES keeps its default", Fix: "rename it LIBVIRT_GCI_MAX_INSTANCES"}, fs[0])
	assert.Equal(t, provision.FindingNote, fs[1].Status)
	assert.Contains(t, fs[1].Detail, "LIBVIRT_GCI_TEST_TEMPLATE is not a setting of this version")
	assert.Equal(t, 0, editDistance("abc", "abc"))
	assert.Equal(t, 3, editDistance("", "abc"))
	assert.Equal(t, 1, editDistance("LIBVIRT_GCI_URL", "LIBVIRT_GCI_URI"))
}
