package main

// A job's stages end to end on the tiny guest: success, a failing script, live output
// and SIGTERM, refused templates, retries, rollback, manual use, a vanished VM.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestConfigPrintsOnlyJSON(t *testing.T) {
	t.Parallel()
	require.NoError(t, buildErr)
	j := &gitlabJob{t: t, dir: t.TempDir()}
	j.env = map[string]string{"JOB_RESPONSE_FILE": filepath.Join(j.dir, "response.json")}
	j.writeResponse("4242", "77", "abcd1234")
	r := j.stage("config")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Empty(t, r.stderr)
	var cfg map[string]any
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &cfg), "stdout must be exactly the JSON: %q", r.stdout)
	assert.Equal(t, "/builds", cfg["builds_dir"])
	assert.Equal(t, "/cache", cfg["cache_dir"])
	assert.Equal(t, false, cfg["builds_dir_is_shared"])
	assert.Equal(t, "bash", cfg["shell"])
	assert.Regexp(t, `^gci-4242-group-my-project-[0-9a-f]{12}$`, cfg["hostname"])
	assert.Equal(t, "libvirt-gci", cfg["driver"].(map[string]any)["name"])
}

// A job as GitLab Runner runs it: every stage, in order, on one VM.
func TestJobSucceeds(t *testing.T) {
	t.Parallel()
	overEachTransport(t, testJobSucceeds)
}

func testJobSucceeds(t *testing.T, j *gitlabJob) {
	name := j.instance()
	j.prepare()

	r := j.run("prepare_script", `echo "Running on $(hostname)"`)
	require.Equal(t, 0, r.code, r.stderr)
	r = j.run("get_sources", `mkdir -p /builds/group/project && cd /builds/group/project && echo "fetched"`)
	require.Equal(t, 0, r.code, r.stderr)
	r = j.run("build_script", `export MY_VAR='value with spaces'
cd /builds/group/project
echo "MY_VAR is $MY_VAR"
echo "to stderr" >&2
echo artifact > out.txt`)
	require.Equal(t, 0, r.code, r.stderr)
	assert.Contains(t, r.stdout, "MY_VAR is value with spaces")
	assert.Contains(t, r.stderr, "to stderr")
	assert.NotContains(t, r.stdout, "to stderr", "stdout and stderr stay apart")
	r = j.run("after_script", `cat /builds/group/project/out.txt`)
	require.Equal(t, 0, r.code, r.stderr)
	assert.Equal(t, "artifact\n", r.stdout)

	// Output arrives byte for byte, whether the stage hands it back with its status
	// (small) or the host reads it from the guest's files (large, or with a NUL byte);
	// a process the script leaves behind does not hold the stage open.
	for _, c := range []struct{ script, stdout, stderr string }{
		{`printf 'a\\b %s\n\n\n' "$0"; printf 'e\n' >&2; sleep 30 >/dev/null 2>&1 &`, "", "e\n"},
		{`printf 'x\000y'; printf 'z\000' >&2`, "x\x00y", "z\x00"},
		{`head -c 20000 /dev/zero | tr '\000' o; printf 'tail\n' >&2`, strings.Repeat("o", 20000), "tail\n"},
		// Scripts of 40 KB (with the exec) and 300 KB (uploaded first).
		{strings.Repeat("# "+strings.Repeat("p", 78)+"\n", 500) + "echo mid\n", "mid\n", ""},
		{strings.Repeat("# "+strings.Repeat("q", 78)+"\n", 3750) + "echo big\n", "big\n", ""},
	} {
		start := time.Now()
		r = j.run("step_script", c.script)
		require.Equal(t, 0, r.code, r.stderr)
		assert.Less(t, time.Since(start), 20*time.Second, "the stage waited for what the script left running")
		if c.stdout == "" {
			assert.Regexp(t, `^a\\b /\S+\n\n\n$`, r.stdout, "$0 is the script's path")
		} else {
			assert.Equal(t, c.stdout, r.stdout)
		}
		assert.True(t, strings.HasSuffix(r.stderr, c.stderr), "stderr %q", r.stderr)
	}

	// No earlier stage's script (with its secrets) or output is left in the guest.
	r = j.run("cleanup_file_variables", leftInGuest)
	require.Equal(t, 0, r.code, r.stderr)
	assert.Empty(t, r.stdout, "files left in the guest's script directory")

	// The job ends once its VM can no longer run: paused, or gone already; a finisher of
	// its own removes it.
	r = j.stage("cleanup")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Contains(t, r.stderr, "stopped "+name)
	if dom, err := j.l.DomainLookupByName(name); err == nil {
		if st, _, err := j.l.DomainGetState(dom, 0); err == nil {
			assert.NotEqual(t, int32(libvirt.DomainRunning), st, "the job's VM runs on after its cleanup")
		}
	}
	assert.Empty(t, leftovers(t, j.l, name), "its finisher did not remove it")
}

func TestBuildScriptFailureRunsAfterScript(t *testing.T) {
	t.Parallel()
	overEachTransport(t, testBuildScriptFailureRunsAfterScript)
}

func testBuildScriptFailureRunsAfterScript(t *testing.T, j *gitlabJob) {
	j.prepare()

	r := j.run("build_script", `echo before; exit 7`)
	assert.Equal(t, 1, r.code, "BUILD_FAILURE_EXIT_CODE")
	assert.Contains(t, r.stdout, "before")
	code, err := os.ReadFile(j.env["BUILD_EXIT_CODE_FILE"])
	require.NoError(t, err)
	assert.Equal(t, "7", strings.TrimSpace(string(code)))

	r = j.run("after_script", `echo after ran`)
	assert.Equal(t, 0, r.code, r.stderr)
	assert.Contains(t, r.stdout, "after ran")

	// A script killed by a signal (the OOM killer, say) is a build failure too, 128+signal.
	r = j.run("build_script", `kill -KILL $$`)
	assert.Equal(t, 1, r.code, r.stderr)
	code, err = os.ReadFile(j.env["BUILD_EXIT_CODE_FILE"])
	require.NoError(t, err)
	assert.Equal(t, "137", strings.TrimSpace(string(code)))

	r = j.stage("cleanup")
	assert.Equal(t, 0, r.code, r.stderr)
}

// Output reaches the job log while the script runs, and SIGTERM (the runner's cancel and
// timeout) ends the stage promptly, kills the script in the guest, and cleanup still works.
func TestLiveOutputAndSIGTERM(t *testing.T) {
	t.Parallel()
	overEachTransport(t, testLiveOutputAndSIGTERM)
}

func testLiveOutputAndSIGTERM(t *testing.T, j *gitlabJob) {
	j.prepare()

	cmd := exec.Command(binPath, "run", j.script("build.sh", `echo started; echo err-started >&2; sleep 613; echo never`), "build_script")
	cmd.Env = j.environ()
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	var stderr lockedBuffer
	cmd.Stderr = &stderr
	require.NoError(t, cmd.Start())
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()

	lines := make(chan string, 16)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	select {
	case l := <-lines:
		require.Equal(t, "started", l)
	case err := <-exited:
		t.Fatalf("run exited (%v) before any output was streamed; stderr:\n%s", err, stderr.String())
	case <-time.After(60 * time.Second):
		t.Fatal("no output streamed within 60 s")
	}
	// The script is still running (sleep 613): the line arrived live, not at exit.
	select {
	case err := <-exited:
		t.Fatalf("run exited early: %v", err)
	default:
	}
	assert.Eventually(t, func() bool { return strings.Contains(stderr.String(), "err-started") }, 10*time.Second, 50*time.Millisecond, "stderr is streamed live too")

	sent := time.Now()
	require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
	select {
	case err := <-exited:
		ee, ok := err.(*exec.ExitError)
		require.True(t, ok, "want a non-zero exit, got %v", err)
		assert.Equal(t, 2, ee.ExitCode(), "a cancelled stage is a system failure")
		t.Logf("run exited %.1f s after SIGTERM", time.Since(sent).Seconds())
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatal("run did not exit within 30 s of SIGTERM")
	}
	for l := range lines {
		assert.NotEqual(t, "never", l)
	}

	// The script's processes are gone from the guest, and so are its files.
	r := j.run("after_script", `n=0
for f in /proc/[0-9]*/cmdline; do
  if tr '\0' ' ' <"$f" 2>/dev/null | grep -q '^sleep 613'; then n=$((n+1)); fi
done
echo "sleepers=$n"
`+leftInGuest)
	require.Equal(t, 0, r.code, r.stderr)
	assert.Equal(t, "sleepers=0\n", r.stdout)

	r = j.stage("cleanup")
	assert.Equal(t, 0, r.code, r.stderr)
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// Templates a job may not have, or that do not exist, fail prepare before anything is
// created, with a one-line error naming the value.
func TestPrepareRejectsTemplates(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, distro, image, want string
	}{
		{"unknown", "tiny-does-not-exist", "", `template "tiny-does-not-exist": no such template`},
		{"not offered", "debian-12", "", `template "debian-12" (from CUSTOM_ENV_DISTRO) is not offered on this runner: no template of that name is marked (libvirt-gci template mark) or matched by LIBVIRT_GCI_TEMPLATES`},
		{"not offered image", "", "alpine:3.20", `template "alpine:3.20" (from CUSTOM_ENV_CI_JOB_IMAGE (the job's image:)) is not offered on this runner`},
		{"path", "../../etc/passwd", "", `template name "../../etc/passwd" is invalid`},
		{"glob", "tiny-*", "", `template name "tiny-*" is invalid`},
		{"shell", "tiny;rm -rf /", "", `template name "tiny;rm -rf /" is invalid`},
		{"none", "", "", "no template chosen"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			j := newJob(t)
			j.env["CUSTOM_ENV_DISTRO"] = tc.distro
			j.env["CUSTOM_ENV_CI_JOB_IMAGE"] = tc.image
			r := j.stage("prepare")
			assert.Equal(t, 2, r.code, "SYSTEM_FAILURE_EXIT_CODE")
			assert.Contains(t, r.stderr, tc.want)
			assert.Equal(t, 1, strings.Count(r.stderr, "\n"), "one line: %q", r.stderr)
			if tc.distro != "tiny-*" {
				assert.NotContains(t, r.stderr, "tiny-*", "the operator's settings stay out of the job log")
			}
			assert.Empty(t, leftovers(t, j.l, j.prefix), "prepare created something")
		})
	}
}

// A template without the guest agent channel is refused with a hint, before anything
// is created.
func TestPrepareRejectsTemplateWithoutAgent(t *testing.T) {
	t.Parallel()
	j := newJob(t)
	name := "tiny-noagent-" + j.jobID
	j.defineTemplate(name, `(?s)<channel type='unix'>.*?</channel>`, "")
	r := j.stage("prepare")
	assert.Equal(t, 2, r.code)
	assert.Contains(t, r.stderr, fmt.Sprintf("template %q has no guest agent channel", name))
}

// GitLab retries prepare; a leftover instance of the same job is replaced. Cleanup is
// idempotent: before prepare, and twice after.
func TestPrepareRetryAndCleanupTwice(t *testing.T) {
	t.Parallel()
	overEachTransport(t, testPrepareRetryAndCleanupTwice)
}

func testPrepareRetryAndCleanupTwice(t *testing.T, j *gitlabJob) {
	r := j.stage("cleanup")
	assert.Equal(t, 0, r.code, "cleanup of an instance that never existed: %s", r.stderr)

	j.prepare()
	r = j.stage("prepare")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Contains(t, r.stderr, "removed leftover instance")
	r = j.run("build_script", "echo second try")
	assert.Equal(t, 0, r.code, r.stderr)

	for i := 0; i < 2; i++ {
		r = j.stage("cleanup")
		assert.Equal(t, 0, r.code, "cleanup #%d: %s", i+1, r.stderr)
	}
	assert.Empty(t, leftovers(t, j.l, j.prefix))
}

// SIGTERM while prepare waits for the guest: prepare exits, and removes what it made.
func TestPrepareSIGTERMRollsBack(t *testing.T) {
	t.Parallel()
	overEachTransport(t, testPrepareSIGTERMRollsBack)
}

func testPrepareSIGTERMRollsBack(t *testing.T, j *gitlabJob) {
	j.warm()
	for start, after := range map[string]string{"boot": "cloned ", "restore": "restored "} {
		j.env["LIBVIRT_GCI_START"] = start
		cmd := exec.Command(binPath, "prepare")
		cmd.Env = j.environ()
		var stderr lockedBuffer
		cmd.Stderr = &stderr
		require.NoError(t, cmd.Start())
		require.Eventually(t, func() bool { return strings.Contains(stderr.String(), after) }, 60*time.Second, 20*time.Millisecond, "prepare did not clone: %s", stderr.String())
		require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
		err := cmd.Wait()
		ee, ok := err.(*exec.ExitError)
		require.True(t, ok, "want a failure exit, got %v; stderr:\n%s", err, stderr.String())
		assert.Equal(t, 2, ee.ExitCode())
		assert.Empty(t, leftovers(t, j.l, j.prefix), "%s: prepare left things behind after SIGTERM:\n%s", start, stderr.String())
	}
}

// warm makes the warm image the job's prepare restores from (with no gitlab-runner
// helper: the test process is not a runner), so that no prepare of the test boots
// because another test is making it.
func (j *gitlabJob) warm() {
	j.t.Helper()
	env := j.env
	j.env = maps.Clone(env)
	j.env["LIBVIRT_GCI_RUNNER_BINARY"] = "none"
	r := j.stage("template", "warm", j.env["CUSTOM_ENV_DISTRO"])
	j.env = env
	require.Equal(j.t, 0, r.code, r.stderr)
}

// Manual use, as with the Python libvirt-gci: no runner, no CUSTOM_ENV_* at all.
func TestManualUse(t *testing.T) {
	t.Parallel()
	j := newJob(t)
	for k := range j.env {
		if strings.HasPrefix(k, "CUSTOM_ENV_") || k == "BUILD_EXIT_CODE_FILE" || k == "JOB_RESPONSE_FILE" {
			delete(j.env, k)
		}
	}
	r := j.stage("prepare")
	assert.Equal(t, 2, r.code)
	assert.Contains(t, r.stderr, "no template chosen")
	r = j.stage("run", j.script("x.sh", "true"))
	assert.Equal(t, 2, r.code)
	assert.Contains(t, r.stderr, "use --machine NAME")
	r = j.stage("cleanup", "--machine", "bad/name")
	assert.Equal(t, 2, r.code)
	assert.Contains(t, r.stderr, `machine name "bad/name" is invalid`)

	machine := j.prefix + "manual"
	r = j.stage("prepare", "--distro", testTmpl, "--machine", machine)
	require.Equal(t, 0, r.code, r.stderr)
	assert.Equal(t, machine+"\n", r.stdout)
	r = j.stage("run", "--machine", machine, "--script", j.script("hello.sh", "echo hello by hand"))
	assert.Equal(t, 0, r.code, r.stderr)
	assert.Equal(t, "hello by hand\n", r.stdout)
	r = j.stage("run", "--machine", machine, j.script("fail.sh", "exit 3"))
	assert.Equal(t, 1, r.code)
	r = j.stage("cleanup", "--machine", machine)
	assert.Equal(t, 0, r.code, r.stderr)

	// cleanup never touches a domain it did not create: the template, say.
	r = j.stage("cleanup", "--machine", testTmpl)
	assert.Equal(t, 2, r.code)
	assert.Contains(t, r.stderr, "was not created by libvirt-gci; refusing to remove it")
	_, err := j.l.DomainLookupByName(testTmpl)
	assert.NoError(t, err, "the template must survive")
}

// A VM that vanishes under a running stage is a system failure, not a build failure.
func TestRunOnVanishedVM(t *testing.T) {
	t.Parallel()
	overEachTransport(t, testRunOnVanishedVM)
}

func testRunOnVanishedVM(t *testing.T, j *gitlabJob) {
	j.prepare()
	name := j.instance()
	cmd := exec.Command(binPath, "run", j.script("b.sh", "echo up; sleep 300"), "build_script")
	cmd.Env = j.environ()
	var out lockedBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	require.NoError(t, cmd.Start())
	require.Eventually(t, func() bool { return strings.Contains(out.String(), "up") }, 60*time.Second, 20*time.Millisecond)
	dom, err := j.l.DomainLookupByName(name)
	require.NoError(t, err)
	require.NoError(t, j.l.DomainDestroy(dom))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		ee, ok := err.(*exec.ExitError)
		require.True(t, ok, "want a failure exit, got %v", err)
		assert.Equal(t, 2, ee.ExitCode(), "SYSTEM_FAILURE: %s", out.String())
	case <-ctx.Done():
		_ = cmd.Process.Kill()
		t.Fatal("run did not notice the VM was gone")
	}
	r := j.stage("cleanup")
	assert.Equal(t, 0, r.code, r.stderr)
}
