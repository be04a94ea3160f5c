package main

// Real pipelines through the real gitlab-runner: the stages that run gitlab-runner
// itself in the guest (caches, artifacts).

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// With LIBVIRT_GCI_CACHE_DIR, a job's cache (saved by gitlab-runner's cache-archiver in
// the guest, into /cache) is found by the next job of the same project, in another VM,
// and not by a job of another project, whatever the cache key.
func TestRunnerCachePerProject(t *testing.T) { overTransports(t, testRunnerCachePerProject) }

func testRunnerCachePerProject(t *testing.T, h *runnerHost) {
	cacheDir := t.TempDir()
	h.env = append(h.env, "LIBVIRT_GCI_CACHE_DIR="+cacheDir)
	cache := func(policy string) []map[string]any {
		return []map[string]any{{"key": "deps", "paths": []string{"vendor/"}, "policy": policy, "when": "on_success", "untracked": false}}
	}
	save := h.gl.add(jobSpec{Cache: cache("push"), Script: []string{
		`mkdir -p vendor && echo "made by job $CI_JOB_ID in $(cat /proc/sys/kernel/random/boot_id)" >vendor/marker`,
	}})
	same := h.gl.add(jobSpec{Cache: cache("pull"), Script: []string{
		`echo "found: $(cat vendor/marker 2>/dev/null || echo nothing)"`,
		`echo "this VM: $(cat /proc/sys/kernel/random/boot_id)"`,
	}})
	other := h.gl.add(jobSpec{ProjectID: 43, Cache: cache("pull"), Script: []string{
		`echo "found: $(cat vendor/marker 2>/dev/null || echo nothing)"`,
		`ls -A /cache`,
	}})
	p := h.runSingle(3)
	var traces []string
	for _, j := range []*fakeJob{save, same, other} {
		final, trace := h.finish(j)
		require.Equal(t, "success", final.State, trace)
		traces = append(traces, trace)
	}
	p.wait(t, time.Minute)

	assert.Contains(t, traces[0], "Saving cache for successful job")
	assert.Contains(t, traces[0], "Created cache")
	var found, me string
	for _, l := range parseTrace(traces[1]) {
		if v, ok := strings.CutPrefix(l.Text, "found: "); ok {
			found = v
		}
		if v, ok := strings.CutPrefix(l.Text, "this VM: "); ok {
			me = v
		}
	}
	assert.Regexp(t, `^made by job \d+ in \S+$`, found, traces[1])
	require.NotEmpty(t, me, traces[1])
	assert.NotContains(t, found, me, "the cache was made in another VM")
	assert.True(t, hasLine(traces[2], "found: nothing"), "project 43 saw project 42's cache:\n%s", traces[2])

	// On the host: one directory per project, only project 42's holds an archive.
	dirs, err := os.ReadDir(cacheDir)
	require.NoError(t, err)
	var archives []string
	_ = filepath.WalkDir(cacheDir, func(p string, d os.DirEntry, err error) error {
		if err == nil && strings.HasSuffix(p, ".zip") {
			archives = append(archives, p)
		}
		return nil
	})
	assert.Len(t, dirs, 2, "a directory per project")
	require.Len(t, archives, 1, "one cache archive")
	assert.Contains(t, archives[0], string(os.PathSeparator)+"project-42-")
	assert.Empty(t, leftovers(t, h.l, h.prefix))
}

// Without the helper (LIBVIRT_GCI_RUNNER_BINARY=none) and a template without its own
// gitlab-runner, the job log says why its artifacts are not uploaded.
func TestRunnerArtifactsWithoutHelper(t *testing.T) {
	h := newRunnerHost(t, "agent")
	h.env = append(h.env, "LIBVIRT_GCI_RUNNER_BINARY=none")
	j := h.gl.add(jobSpec{
		Script:    []string{`echo data >out.txt`},
		Artifacts: []map[string]any{{"name": "out", "paths": []string{"out.txt"}, "when": "on_success", "artifact_type": "archive", "artifact_format": "zip"}},
	})
	p := h.runSingle(1)
	final, trace := h.finish(j)
	p.wait(t, time.Minute)
	assert.Equal(t, "success", final.State, trace)
	assert.Contains(t, trace, "the guest gets no gitlab-runner (LIBVIRT_GCI_RUNNER_BINARY=none)")
	assert.Contains(t, trace, "Missing gitlab-runner. Uploading artifacts is disabled.")
}
