package main

// End-to-end tests with the real client: a genuine gitlab-runner (custom executor) takes
// jobs from the fake GitLab on 127.0.0.1 and drives the built libvirt-gci with the
// config.toml from README.rst, on the real test VM. The runner decides the stage order,
// the environment, the retries and the signals; these tests check what GitLab is told.

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/libvirt-gci/libvirt-gci/cmd/libvirt-gci/internal/fakegitlab"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// gitlabRunnerBin is the runner under test: $GITLAB_RUNNER_BIN, else gitlab-runner on PATH
// (scripts/testenv.sh builds one when neither exists and make test passes it on).
func gitlabRunnerBin(t testing.TB) string {
	t.Helper()
	if p := os.Getenv("GITLAB_RUNNER_BIN"); p != "" {
		return p
	}
	if p, err := exec.LookPath("gitlab-runner"); err == nil {
		return p
	}
	msg := "no gitlab-runner: set GITLAB_RUNNER_BIN or put gitlab-runner on PATH (scripts/testenv.sh setup builds one)"
	if os.Getenv("LIBVIRT_GCI_E2E") == "1" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}

// readmeConfig is the config.toml snippet of README.rst with url, token and the binary's
// path replaced, and the runner's name from it.
func readmeConfig(t testing.TB, url, token, bin string) (config, name string) {
	t.Helper()
	readme, err := os.ReadFile("../../README.rst")
	require.NoError(t, err)
	// The block may be indented (in a list item): its lines are indented deeper.
	blocks := regexp.MustCompile(`(?m)^( *)\.\. code-block:: toml\n\n((?:(?: {3,}.*)?\n)+)`).FindAllStringSubmatch(string(readme), -1)
	require.Len(t, blocks, 1, "README.rst must have exactly one toml block, the runner's config.toml")
	indent := len(blocks[0][1]) + 3
	var lines []string
	for _, l := range strings.Split(blocks[0][2], "\n") {
		if len(l) >= indent && strings.TrimSpace(l[:indent]) == "" {
			l = l[indent:]
		} else {
			require.Empty(t, strings.TrimSpace(l), "README's toml block ends where its indentation does")
		}
		lines = append(lines, l)
	}
	config = strings.Join(lines, "\n")

	replace := func(re, with string) {
		t.Helper()
		r := regexp.MustCompile(re)
		require.Len(t, r.FindAllString(config, -1), 1, "README's config.toml: want one match of %s", re)
		config = r.ReplaceAllLiteralString(config, with)
	}
	replace(`(?m)^\s*url = ".*"$`, fmt.Sprintf("url = %q", url))
	replace(`(?m)^\s*token = ".*"$`, fmt.Sprintf("token = %q", token))
	require.Equal(t, 4, strings.Count(config, `"/usr/bin/libvirt-gci"`), "README's config.toml calls libvirt-gci for the four stages")
	config = strings.ReplaceAll(config, `"/usr/bin/libvirt-gci"`, fmt.Sprintf("%q", bin))
	m := regexp.MustCompile(`(?m)^\s*name = "(.+)"$`).FindStringSubmatch(config)
	require.NotNil(t, m, "README's config.toml has no runner name")
	return config, m[1]
}

// runnerHost is one runner host: a config.toml, a fake GitLab and the runner's environment.
type runnerHost struct {
	t      testing.TB
	l      *libvirt.Libvirt
	gl     *fakegitlab.GitLab
	bin    string
	config string
	name   string
	prefix string
	env    []string
}

// overTransports runs f once per transport, the two at once, each with a runner host
// (runner, fake GitLab, instance prefix) of its own. The tests whose timings are at stake
// (timeouts, cancels, overlapping jobs) are not parallel at the top: they run first,
// among their own subtests only (tiny guests, restored), and check first that libvirt is
// quick (requireFastLibvirt); the others are parallel, after them, when a define may take
// seconds (CI saw 9 s) without harm.
func overTransports(t *testing.T, f func(t *testing.T, h *runnerHost)) {
	for _, tr := range transports {
		t.Run(tr, func(t *testing.T) {
			t.Parallel()
			f(t, newRunnerHost(t, tr))
		})
	}
}

func newRunnerHost(t testing.TB, transport string) *runnerHost {
	t.Helper()
	l := lv(t)
	h := &runnerHost{t: t, l: l, bin: gitlabRunnerBin(t), gl: fakegitlab.New(t)}
	h.prefix, _ = testPrefix(t)
	dir := t.TempDir()
	config, name := readmeConfig(t, h.gl.URL(), h.gl.RunnerToken, binPath)
	h.config, h.name = filepath.Join(dir, "config.toml"), name
	require.NoError(t, os.WriteFile(h.config, []byte(config), 0o600))
	tmp := filepath.Join(dir, "tmp")
	require.NoError(t, os.Mkdir(tmp, 0o700))
	// The operator's settings, as a systemd drop-in would give them to the runner service.
	h.env = append(hostEnviron(),
		"LIBVIRT_GCI_URI="+testURI,
		"LIBVIRT_GCI_POOL="+testPool,
		"LIBVIRT_GCI_PREFIX="+h.prefix,
		"LIBVIRT_GCI_TEMPLATES=tiny-*",
		"LIBVIRT_GCI_DEFAULT_TEMPLATE="+testTmpl,
		"LIBVIRT_GCI_BOOT_TIMEOUT=3m",
		"LIBVIRT_GCI_TRANSPORT="+transport,
		"LIBVIRT_GCI_SECRET_FILE="+filepath.Join(dir, "secret"),
		"TMPDIR="+tmp,
	)
	t.Cleanup(func() {
		assertNothingLeft(t, l, h.prefix)
		h.sweep()
	})
	return h
}

// sweep removes what a failed test left, so that one failure does not leave VMs running.
func (h *runnerHost) sweep() {
	doms, _, err := h.l.ConnectListAllDomains(1, 0)
	if err != nil {
		return
	}
	for _, d := range doms {
		if strings.HasPrefix(d.Name, h.prefix) {
			cmd := exec.Command(binPath, "cleanup", "--machine", d.Name)
			cmd.Env = h.env
			_ = cmd.Run()
		}
	}
}

// runnerProc is a running gitlab-runner.
type runnerProc struct {
	cmd    *exec.Cmd
	log    lockedBuffer
	exited chan struct{}
	err    error
}

// start runs gitlab-runner with args; the test fails if it is still running at the end.
func (h *runnerHost) start(args ...string) *runnerProc {
	h.t.Helper()
	p := &runnerProc{exited: make(chan struct{})}
	p.cmd = exec.Command(h.bin, args...)
	p.cmd.Env = h.env
	p.cmd.Stdout, p.cmd.Stderr = &p.log, &p.log
	require.NoError(h.t, p.cmd.Start())
	go func() { p.err = p.cmd.Wait(); close(p.exited) }()
	h.t.Cleanup(func() {
		select {
		case <-p.exited:
		default:
			_ = p.cmd.Process.Signal(syscall.SIGKILL)
			<-p.exited
			h.t.Errorf("gitlab-runner still running at the end of the test")
		}
		if h.t.Failed() {
			h.t.Logf("gitlab-runner %s log:\n%s", args[0], p.log.String())
		}
	})
	return p
}

// warm makes the warm image that this runner's jobs are restored from (the profile of
// its settings, with its gitlab-runner as the helper), so that they need not boot while
// another test makes it.
func (h *runnerHost) warm(template string) {
	h.t.Helper()
	cmd := exec.Command(binPath, "template", "warm", template)
	cmd.Env = append(h.env, "LIBVIRT_GCI_RUNNER_BINARY="+h.bin)
	out, err := cmd.CombinedOutput()
	require.NoError(h.t, err, "%s", out)
}

// runSingle processes n jobs, one at a time, as `gitlab-runner run-single`.
func (h *runnerHost) runSingle(n int) *runnerProc {
	return h.start("run-single", "-c", h.config, "-r", h.name, "--max-builds", fmt.Sprint(n), "--wait-timeout", "15")
}

// wait waits for the runner to exit by itself.
func (p *runnerProc) wait(t testing.TB, limit time.Duration) {
	t.Helper()
	select {
	case <-p.exited:
		require.NoError(t, p.err, "gitlab-runner failed")
	case <-time.After(limit):
		t.Fatalf("gitlab-runner did not exit within %s", limit)
	}
}

// finish waits for the job's final state from the runner, and returns it with the trace.
func (h *runnerHost) finish(j *fakegitlab.Job) (fakegitlab.Update, string) {
	h.t.Helper()
	require.True(h.t, h.gl.Wait(j, 6*time.Minute), "job %d not finished; trace so far:\n%s", j.ID, h.gl.Trace(j))
	return h.gl.Final(j), h.gl.Trace(j)
}

func exitCode(u fakegitlab.Update) int {
	if u.ExitCode == nil {
		return -1
	}
	return *u.ExitCode
}

func TestRunnerJobSucceeds(t *testing.T) {
	t.Parallel()
	overTransports(t, testRunnerJobSucceeds)
}

func testRunnerJobSucceeds(t *testing.T, h *runnerHost) {
	j := h.gl.Add(fakegitlab.JobSpec{
		Script: []string{
			`echo "greeting=$GREETING"`,
			`echo "in $PWD on $(hostname) as $(id -un)"`,
			`echo to-stderr >&2`,
			`echo "helper: $(gitlab-runner --version | head -1)"`,
		},
		AfterScript: []string{`echo "after_script sees $CI_JOB_STATUS"`},
		Variables:   map[string]string{"GREETING": "hello from a job variable"},
	})
	h.warm(testTmpl)
	p := h.runSingle(1)
	final, trace := h.finish(j)
	p.wait(t, time.Minute)

	assert.Equal(t, "success", final.State, trace)
	assert.True(t, fakegitlab.HasLine(trace, "greeting=hello from a job variable"), trace)
	if l := fakegitlab.FindLine(trace, "to-stderr"); assert.NotNil(t, l) {
		assert.True(t, l.Stderr, "stderr is kept apart from stdout")
	}
	assert.True(t, fakegitlab.HasLine(trace, "after_script sees success"))
	assert.Contains(t, trace, "Using Custom executor with driver libvirt-gci")
	assert.Contains(t, trace, "restored "+testTmpl+" into ", "restored from its warm image (LIBVIRT_GCI_START=restore, the default)")
	assert.Regexp(t, `in /builds/group/hello on \S+ as root`, trace)
	assert.NotContains(t, trace, j.Token, "the job token is masked")
	assert.Empty(t, leftovers(t, h.l, h.prefix), "cleanup ran")
	// The guest has the very gitlab-runner that drove the job, on its PATH.
	version, err := exec.Command(h.bin, "--version").Output()
	require.NoError(t, err)
	first, _, _ := strings.Cut(string(version), "\n")
	assert.True(t, fakegitlab.HasLine(trace, "helper: "+first), "want %q in the guest:\n%s", first, trace)
}

func TestRunnerScriptFailure(t *testing.T) {
	t.Parallel()
	overTransports(t, testRunnerScriptFailure)
}

func testRunnerScriptFailure(t *testing.T, h *runnerHost) {
	j := h.gl.Add(fakegitlab.JobSpec{
		Script:      []string{`echo before`, `exit 7`, `echo never`},
		AfterScript: []string{`echo "after_script sees $CI_JOB_STATUS"`},
	})
	p := h.runSingle(1)
	final, trace := h.finish(j)
	p.wait(t, time.Minute)

	assert.Equal(t, "failed", final.State, trace)
	assert.Equal(t, "script_failure", final.FailureReason)
	assert.Equal(t, 7, exitCode(final))
	assert.True(t, fakegitlab.HasLine(trace, "before"))
	assert.False(t, fakegitlab.HasLine(trace, "never"), "the script went on after exit 7")
	assert.True(t, fakegitlab.HasLine(trace, "after_script sees failed"))
	assert.Empty(t, leftovers(t, h.l, h.prefix))
}

// A template the runner does not allow: prepare fails as a system failure, GitLab Runner
// tries it three times, and nothing is ever created.
func TestRunnerDisallowedTemplate(t *testing.T) {
	t.Parallel()
	overTransports(t, testRunnerDisallowedTemplate)
}

func testRunnerDisallowedTemplate(t *testing.T, h *runnerHost) {
	j := h.gl.Add(fakegitlab.JobSpec{Script: []string{`echo never`}, Variables: map[string]string{"DISTRO": "windows-11"}})
	p := h.runSingle(1)
	final, trace := h.finish(j)
	p.wait(t, time.Minute)

	assert.Equal(t, "failed", final.State, trace)
	assert.Equal(t, "runner_system_failure", final.FailureReason)
	msg := `template "windows-11" (from CUSTOM_ENV_DISTRO) is not offered on this runner`
	assert.Equal(t, 3, strings.Count(trace, msg), "prepare tried three times:\n%s", trace)
	assert.False(t, fakegitlab.HasLine(trace, "never"))
	assert.Empty(t, leftovers(t, h.l, h.prefix))
}

// sleepersCheck counts, in the guest, the processes of a job's `sleep 613`.
const sleepersCheck = `n=0; for f in /proc/[0-9]*/cmdline; do if tr '\0' ' ' <"$f" 2>/dev/null | grep -q '^sleep 613'; then n=$((n+1)); fi; done; echo "sleepers=$n"`

// The job's timeout ends a long script: the run stage stops at once on the runner's
// SIGTERM (not after graceful_kill_timeout), and the VM is removed. With
// RUNNER_SCRIPT_TIMEOUT the script times out but after_script still runs in the same VM,
// which shows that the script's processes are gone.
func TestRunnerTimeouts(t *testing.T) { overTransports(t, testRunnerTimeouts) }

func testRunnerTimeouts(t *testing.T, h *runnerHost) {
	requireFastLibvirt(t, h.l)
	h.warm(testTmpl) // the job's 20 s are for a restore, not for making the warm image too
	const timeout = 20
	// The guest's uptime around the sleep: CI once saw this job succeed 11 s into its
	// sleep, and these lines tell a sleep that ended early from a status misread.
	job := h.gl.Add(fakegitlab.JobSpec{Script: []string{`echo started`, `echo "uptime before: $(cat /proc/uptime)"`, `sleep 613`,
		`echo "sleep 613 ended: $(cat /proc/uptime)"`}, Timeout: timeout})
	script := h.gl.Add(fakegitlab.JobSpec{
		Script:      []string{`echo started`, `sleep 613`},
		AfterScript: []string{sleepersCheck},
		Variables:   map[string]string{"RUNNER_SCRIPT_TIMEOUT": "8s"},
	})
	p := h.runSingle(2)

	final, trace := h.finish(job)
	assert.Equal(t, "failed", final.State, trace)
	assert.Equal(t, "job_execution_timeout", final.FailureReason)
	require.True(t, fakegitlab.HasLine(trace, "started"), "the %d s job timeout hit before the script started: prepare took too long; is libvirt slow?\n%s", timeout, trace)
	taken, finished := h.gl.Times(job)
	took := finished.Sub(taken)
	assert.Less(t, took, (timeout+20)*time.Second, "the job took %s for a %d s timeout", took, timeout)

	final, trace = h.finish(script)
	assert.Equal(t, "failed", final.State, trace)
	assert.Equal(t, "job_execution_timeout", final.FailureReason)
	assert.True(t, fakegitlab.HasLine(trace, "started"))
	assert.True(t, fakegitlab.HasLine(trace, "sleepers=0"), "the script's processes are gone:\n%s", trace)
	p.wait(t, time.Minute)
	assert.Empty(t, leftovers(t, h.l, h.prefix))
}

// GitLab cancels a running job: "canceling" (graceful: after_script still runs, in the
// same VM) and "canceled" (abort). Either way the script stops and the VM goes.
func TestRunnerCancel(t *testing.T) {
	for _, transport := range transports {
		for _, status := range []string{"canceling", "canceled"} {
			t.Run(transport+"/"+status, func(t *testing.T) {
				t.Parallel()
				h := newRunnerHost(t, transport)
				requireFastLibvirt(t, h.l)
				// The runner hears of a cancel in the answer to its next trace upload, so the
				// script keeps printing (else that is the keep-alive, every 30 s).
				j := h.gl.Add(fakegitlab.JobSpec{
					Script:      []string{`echo started`, `sleep 613 & while sleep 0.5; do echo tick; done`},
					AfterScript: []string{`echo "after_script sees $CI_JOB_STATUS"`, sleepersCheck},
				})
				p := h.runSingle(1)
				require.Eventually(t, func() bool { return fakegitlab.HasLine(h.gl.Trace(j), "started") },
					3*time.Minute, 100*time.Millisecond, "the script never started:\n%s", h.gl.Trace(j))
				sent := time.Now()
				h.gl.Cancel(j, status)
				p.wait(t, 2*time.Minute)
				took := time.Since(sent)
				t.Logf("the runner was done %.1f s after the cancel", took.Seconds())
				// Had the run stage ignored SIGTERM, the runner would wait graceful_kill_timeout (10 min).
				assert.Less(t, took, time.Minute)
				final, trace := h.gl.Final(j), h.gl.Trace(j)
				assert.Equal(t, "failed", final.State, trace)
				assert.Equal(t, "job_canceled", final.FailureReason)
				if status == "canceling" {
					assert.True(t, fakegitlab.HasLine(trace, "after_script sees canceled"))
					assert.True(t, fakegitlab.HasLine(trace, "sleepers=0"), "the script's processes are gone:\n%s", trace)
				}
				assert.Empty(t, leftovers(t, h.l, h.prefix))
			})
		}
	}
}

// Two jobs at once with concurrent = 2 and limit = 2 (the README's config.toml, run by
// `gitlab-runner run` as a service would): both succeed, each in its own VM. The second
// job claims to be the first (its variables: set the first's CI_JOB_ID and project),
// which must not get it the first's VM.
func TestRunnerTwoJobsAtOnce(t *testing.T) { overTransports(t, testRunnerTwoJobsAtOnce) } // alone: the jobs must overlap

func testRunnerTwoJobsAtOnce(t *testing.T, h *runnerHost) {
	requireFastLibvirt(t, h.l)
	script := []string{`echo "job $WHO: $CI_JOB_ID on $CI_RUNNER_SHORT_TOKEN/$CI_CONCURRENT_ID"`, `sleep 10`, `echo "done $WHO in $(cat /proc/sys/kernel/random/boot_id)"`}
	a := h.gl.Add(fakegitlab.JobSpec{Script: script, Variables: map[string]string{"WHO": "a"}})
	b := h.gl.Add(fakegitlab.JobSpec{Script: script, Variables: map[string]string{"WHO": "b",
		"CI_JOB_ID": fmt.Sprint(a.ID), "CI_PROJECT_PATH": "group/hello", "CI_PROJECT_ID": "42"}})
	p := h.start("run", "-c", h.config, "--working-directory", filepath.Dir(h.config))

	// Watch libvirt: which instances exist, and how many at once.
	seen, most := map[string]bool{}, 0
	stop := time.After(6 * time.Minute)
	for done := false; !done; {
		doms, _, err := h.l.ConnectListAllDomains(1, libvirt.ConnectListDomainsActive)
		require.NoError(t, err)
		n := 0
		for _, d := range doms {
			if strings.HasPrefix(d.Name, h.prefix) {
				seen[d.Name] = true
				n++
			}
		}
		most = max(most, n)
		select {
		case <-a.Done():
			select {
			case <-b.Done():
				done = true
			default:
			}
		case <-stop:
			t.Fatalf("jobs not finished; traces:\n%s\n%s", h.gl.Trace(a), h.gl.Trace(b))
		case <-time.After(100 * time.Millisecond):
		}
	}
	require.NoError(t, p.cmd.Process.Signal(syscall.SIGQUIT)) // stop after the running builds
	p.wait(t, time.Minute)

	boots := map[string]bool{}
	for who, j := range map[string]*fakegitlab.Job{"a": a, "b": b} {
		final, trace := h.gl.Final(j), h.gl.Trace(j)
		assert.Equal(t, "success", final.State, trace)
		m := regexp.MustCompile(`\bdone ` + who + ` in ([0-9a-f-]{36})`).FindStringSubmatch(trace)
		if assert.NotNil(t, m, trace) {
			boots[m[1]] = true
		}
	}
	assert.Len(t, boots, 2, "each job ran in a VM of its own")
	assert.Equal(t, 2, most, "both jobs' VMs ran at the same time")
	assert.Len(t, seen, 2, "one VM per job: %v", seen)
	aTaken, aFinished := h.gl.Times(a)
	bTaken, bFinished := h.gl.Times(b)
	assert.True(t, aTaken.Before(bFinished) && bTaken.Before(aFinished), "the jobs overlapped")
	assert.Empty(t, leftovers(t, h.l, h.prefix))
}
