package main

// Real pipelines through the real gitlab-runner: the stages that run gitlab-runner
// itself in the guest (caches, artifacts).

import (
	"archive/zip"
	"bytes"
	"io"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/libvirt-gci/libvirt-gci/cmd/libvirt-gci/internal/fakegitlab"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// With LIBVIRT_GCI_CACHE_DIR, a job's cache (saved by gitlab-runner's cache-archiver in
// the guest, into /cache) is found by the next job of the same project, in another VM,
// and not by a job of another project, whatever the cache key.
func TestRunnerCachePerProject(t *testing.T) {
	t.Parallel() // no timings at stake: alongside the other parallel tests
	overTransports(t, testRunnerCachePerProject)
}

func testRunnerCachePerProject(t *testing.T, h *runnerHost) {
	cacheDir := cacheDir(t)
	h.env = append(h.env, "LIBVIRT_GCI_CACHE_DIR="+cacheDir)
	cache := func(policy string) []map[string]any {
		return []map[string]any{{"key": "deps", "paths": []string{"vendor/"}, "policy": policy, "when": "on_success", "untracked": false}}
	}
	save := h.gl.Add(fakegitlab.JobSpec{Cache: cache("push"), Script: []string{
		`mkdir -p vendor && echo "made by job $CI_JOB_ID in $(cat /proc/sys/kernel/random/boot_id)" >vendor/marker`,
	}})
	same := h.gl.Add(fakegitlab.JobSpec{Cache: cache("pull"), Script: []string{
		`echo "found: $(cat vendor/marker 2>/dev/null || echo nothing)"`,
		`echo "this VM: $(cat /proc/sys/kernel/random/boot_id)"`,
	}})
	other := h.gl.Add(fakegitlab.JobSpec{ProjectID: 43, Cache: cache("pull"), Script: []string{
		`echo "found: $(cat vendor/marker 2>/dev/null || echo nothing)"`,
		`ls -A /cache`,
	}})
	h.warm(testTmpl) // with the share's profile: no job boots while another test makes it
	p := h.runSingle(3)
	var traces []string
	for _, j := range []*fakegitlab.Job{save, same, other} {
		final, trace := h.finish(j)
		require.Equal(t, "success", final.State, trace)
		traces = append(traces, trace)
	}
	p.wait(t, time.Minute)

	// Restored, the share attached after (issue 25): every job.
	restored := regexp.MustCompile(`restored \S+ into \S+ from \S+ in \d+ ms .*cache share attached in \d+ ms`)
	for _, tr := range traces {
		assert.Regexp(t, restored, tr)
	}
	assert.Contains(t, traces[0], "Saving cache for successful job")
	assert.Contains(t, traces[0], "Created cache")
	var found, me string
	for _, l := range fakegitlab.ParseTrace(traces[1]) {
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
	assert.True(t, fakegitlab.HasLine(traces[2], "found: nothing"), "project 43 saw project 42's cache:\n%s", traces[2])

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
	assert.Contains(t, archives[0], string(os.PathSeparator)+"p-42-")
	assert.Contains(t, archives[0], "/unprotected/", "GitLab did not say the job is protected")
	assert.Empty(t, leftovers(t, h.l, h.prefix))
}

// What a job writes through its cache stays out of reach of the host's users and of the
// project's protected jobs (issue 24): a job, root in its guest, plants a setuid shell,
// a symlink to / and a poisoned cache for the protected pipeline, and makes its share
// world-writable. After it, an unprivileged host user reaches none of it, the share's
// root is 0700 again, and the next protected job of the project finds its own, empty,
// cache. Then that protected job's cache is not what the next unprotected job sees.
func TestRunnerCacheTrust(t *testing.T) {
	t.Parallel()
	overTransports(t, testRunnerCacheTrust)
}

func testRunnerCacheTrust(t *testing.T, h *runnerHost) {
	cacheDir := cacheDir(t) // others may enter it: the tool's directories must close it
	h.env = append(h.env, "LIBVIRT_GCI_CACHE_DIR="+cacheDir, "LIBVIRT_GCI_CACHE_SIZE=64M")
	yes, no := true, false
	cache := func(policy string) []map[string]any {
		return []map[string]any{{"key": "deps", "paths": []string{"vendor/"}, "policy": policy, "when": "on_success", "untracked": false}}
	}
	attack := h.gl.Add(fakegitlab.JobSpec{Protected: &no, Cache: cache("push"), Script: []string{
		`mkdir -p vendor && echo poisoned >vendor/marker`,
		`cp /bin/sh /cache/sh && chmod 4755 /cache/sh && ls -l /cache/sh`,
		`ln -s / /cache/rootlink && chmod 777 /cache`,
		`if dd if=/dev/zero of=/cache/fill bs=1M count=100 2>/tmp/dd.err; then echo "filled 100M"; else grep -o "No space left on device" /tmp/dd.err | head -1; fi; rm -f /cache/fill`,
		`for d in /cache/*/; do mkdir -p "${d}deps-protected" && echo poisoned >"${d}deps-protected/planted"; done; ls -R /cache | head -20`,
	}})
	protected := h.gl.Add(fakegitlab.JobSpec{Protected: &yes, Cache: cache("pull-push"), Script: []string{
		`echo "found: $(cat vendor/marker 2>/dev/null || echo nothing)"`,
		`echo "planted: $(find /cache -name planted -o -name sh -o -name rootlink | wc -l)"`,
		`mkdir -p vendor && echo secret >vendor/marker`,
	}})
	after := h.gl.Add(fakegitlab.JobSpec{Protected: &no, Cache: cache("pull"), Script: []string{
		`echo "found: $(cat vendor/marker 2>/dev/null || echo nothing)"`,
	}})
	p := h.runSingle(3)
	var traces []string
	for _, j := range []*fakegitlab.Job{attack, protected, after} {
		final, trace := h.finish(j)
		require.Equal(t, "success", final.State, trace)
		traces = append(traces, trace)
	}
	p.wait(t, time.Minute)
	assert.Regexp(t, `-rwsr-xr-x .* /cache/sh`, traces[0], "the job is root in its guest and made its setuid shell")
	assert.True(t, fakegitlab.HasLine(traces[1], "found: nothing"), "the protected job saw the unprotected one's cache:\n%s", traces[1])
	assert.True(t, fakegitlab.HasLine(traces[1], "planted: 0"), traces[1])
	assert.True(t, fakegitlab.HasLine(traces[2], "found: poisoned"), "an unprotected job sees its own kind's cache, not the protected one's:\n%s", traces[2])

	// On the host: the setuid shell is there, but below directories only root enters.
	var setuid []string
	_ = filepath.WalkDir(cacheDir, func(p string, d os.DirEntry, err error) error {
		if fi, err2 := d.Info(); err == nil && err2 == nil && fi.Mode()&os.ModeSetuid != 0 {
			setuid = append(setuid, p)
		}
		return nil
	})
	require.Len(t, setuid, 1, "the planted shell")
	assert.True(t, fakegitlab.HasLine(traces[0], "No space left on device"), "the project's cache has its size (64M):\n%s", traces[0])
	mounts := mountsBelow(t, cacheDir)
	require.Len(t, mounts, 2, "a file system per share: %v", mounts)
	for m, opts := range mounts {
		assert.Contains(t, opts, "nosuid", m)
		assert.Contains(t, opts, "nodev", m)
	}
	for _, p := range []string{setuid[0], filepath.Join(filepath.Dir(setuid[0]), "rootlink", "etc", "shadow")} {
		out, err := exec.Command("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "test", "-e", p).CombinedOutput()
		assert.Error(t, err, "an unprivileged host user reaches %s: %s", p, out)
	}
	for _, d := range []string{filepath.Dir(setuid[0]), filepath.Dir(filepath.Dir(setuid[0]))} {
		fi, err := os.Lstat(d)
		require.NoError(t, err)
		assert.Equal(t, os.FileMode(0o700), fi.Mode().Perm(), "%s: the share's root and its project directory keep the tool's mode", d)
	}
	assert.Empty(t, leftovers(t, h.l, h.prefix))
}

// Without the helper (LIBVIRT_GCI_RUNNER_BINARY=none) and a template without its own
// gitlab-runner, the job log says why its artifacts are not uploaded.
func TestRunnerArtifactsWithoutHelper(t *testing.T) {
	t.Parallel()
	h := newRunnerHost(t, "agent")
	h.env = append(h.env, "LIBVIRT_GCI_RUNNER_BINARY=none")
	j := h.gl.Add(fakegitlab.JobSpec{
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

// A pipeline through the real runner, over either transport: a job clones the project
// (GIT_STRATEGY fetch: git in the guest, over the fake GitLab's smart HTTP), puts a file
// of the cloned sources in its artifacts, and the fake GitLab receives exactly that file
// (artifacts-uploader in the guest, the helper); a second job needs the first and finds
// the file (artifacts-downloader). The guest reaches the fake GitLab at the runner's own
// URL, 127.0.0.1:PORT, through LIBVIRT_GCI_GUEST_FORWARDS, and nothing else.
func TestRunnerPipeline(t *testing.T) {
	t.Parallel()
	overTransports(t, testRunnerPipeline)
}

func testRunnerPipeline(t *testing.T, h *runnerHost) {
	u, err := url.Parse(h.gl.URL())
	require.NoError(t, err)
	h.env = append(h.env, "LIBVIRT_GCI_GUEST_FORWARDS="+u.Host)
	build := h.gl.Add(fakegitlab.JobSpec{Fetch: true,
		Script:    []string{`cp src/greeting.txt out.txt`, `git log --oneline | head -1`},
		Artifacts: []map[string]any{{"name": "out", "paths": []string{"out.txt"}, "when": "on_success", "artifact_type": "archive", "artifact_format": "zip"}},
	})
	h.warm(testTmpl)
	p := h.runSingle(2)
	final, trace := h.finish(build)
	require.Equal(t, "success", final.State, trace)
	assert.Contains(t, trace, "restored "+testTmpl+" into ")
	assert.Contains(t, trace, "Uploading artifacts")
	rp := h.gl.GitRepo(t)
	zr, err := zip.NewReader(bytes.NewReader(h.gl.Artifacts(build)), int64(len(h.gl.Artifacts(build))))
	require.NoError(t, err, "the artifacts archive:\n%s", trace)
	var names []string
	for _, f := range zr.File {
		names = append(names, f.Name)
	}
	require.Equal(t, []string{"out.txt"}, names)
	rc, err := zr.File[0].Open()
	require.NoError(t, err)
	got, _ := io.ReadAll(rc)
	assert.Equal(t, rp.Content, string(got), "the file from the cloned sources")

	test := h.gl.Add(fakegitlab.JobSpec{Needs: []*fakegitlab.Job{build}, Script: []string{`echo "artifact: $(cat out.txt)"`}})
	final, trace = h.finish(test)
	p.wait(t, time.Minute)
	require.Equal(t, "success", final.State, trace)
	assert.True(t, fakegitlab.HasLine(trace, "artifact: "+strings.TrimSpace(rp.Content)), trace)
	assert.Empty(t, leftovers(t, h.l, h.prefix))
}
