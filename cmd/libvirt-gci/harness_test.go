package main

// End-to-end tests: the built binary, called the way GitLab Runner calls it, against the
// real libvirtd, real QEMU and the tiny test guest that scripts/testenv.sh sets up.
//
// Without that environment they skip, unless LIBVIRT_GCI_E2E=1 (make test, CI), where a
// missing environment is a failure.

import (
	"bytes"
	"cmp"
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

var (
	binPath  string // the libvirt-gci binary under test
	buildErr error
	testURI  = envOr("LIBVIRT_GCI_URI", "qemu:///system")
	testTmpl = envOr("LIBVIRT_GCI_TEST_TEMPLATE", "tiny-bookworm")
	// the same guest with a NIC of its own, on a libvirt network that reaches nothing
	testNICTmpl = envOr("LIBVIRT_GCI_TEST_NIC_TEMPLATE", testTmpl+"-nic")
	testPool    = envOr("LIBVIRT_GCI_TEST_POOL", "gci-test")
	jobSerial   atomic.Int64
	cleanupsMu  sync.Mutex
	cleanups    []func() // what TestMain undoes once the tests are done (the sshds)
)

// addCleanup has TestMain run f once the tests are done.
func addCleanup(f func()) {
	cleanupsMu.Lock()
	defer cleanupsMu.Unlock()
	cleanups = append(cleanups, f)
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "libvirt-gci-e2e")
	if err != nil {
		panic(err)
	}
	binPath = filepath.Join(dir, "libvirt-gci")
	out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput()
	if err != nil {
		buildErr = fmt.Errorf("go build: %v\n%s", err, out)
	}
	code := m.Run()
	for _, f := range cleanups {
		f()
	}
	os.RemoveAll(dir)
	os.Exit(code)
}

// lv connects to libvirt for the test's own checks, or skips/fails when it cannot.
func lv(t testing.TB) *libvirt.Libvirt {
	t.Helper()
	require.NoError(t, buildErr)
	required := os.Getenv("LIBVIRT_GCI_E2E") == "1"
	if testing.Short() && !required {
		t.Skip("real-VM test; -short given")
	}
	fail := func(format string, args ...any) {
		t.Helper()
		msg := fmt.Sprintf(format, args...) + " (run scripts/testenv.sh setup)"
		if required {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	u, _ := url.Parse(testURI)
	l, err := libvirt.ConnectToURI(u)
	if err != nil {
		fail("no libvirt at %s: %v", testURI, err)
	}
	t.Cleanup(func() { _ = l.Disconnect() })
	for _, tmpl := range []string{testTmpl, testNICTmpl} {
		if _, err := l.DomainLookupByName(tmpl); err != nil {
			fail("no template %q (scripts/testenv.sh setup defines it): %v", tmpl, err)
		}
	}
	if _, err := l.StoragePoolLookupByName(testPool); err != nil {
		fail("no storage pool %q: %v", testPool, err)
	}
	return l
}

// requireFastLibvirt fails the test at once, saying why, when libvirt takes seconds to
// define a domain (see "Slow libvirt" in README.rst): tests whose clocks include prepare,
// such as a job timeout, would otherwise fail with a misleading message.
func requireFastLibvirt(t testing.TB, l *libvirt.Libvirt) {
	t.Helper()
	x := templateVariant(t, l, fmt.Sprintf("e2e-speedcheck-%d-%d", os.Getpid(), jobSerial.Add(1)))
	start := time.Now()
	dom, err := l.DomainDefineXMLFlags(x, libvirt.DomainDefineValidate)
	took := time.Since(start)
	require.NoError(t, err)
	require.NoError(t, l.DomainUndefine(dom))
	require.Less(t, took, 2*time.Second, "libvirt is slow: a define took %s; the timings this test checks would be wrong. "+
		"libvirtd is probably probing QEMU again on every call (see \"Slow libvirt\" in README.rst)", took)
}

// templateVariant is the test template's inactive XML as a new domain called name (no
// UUID, no metadata), with each edit applied: pairs of a regexp and its replacement.
func templateVariant(t testing.TB, l *libvirt.Libvirt, name string, edits ...string) string {
	t.Helper()
	return templateVariantOf(t, l, testTmpl, name, edits...)
}

// templateVariantOf is templateVariant of the template base.
func templateVariantOf(t testing.TB, l *libvirt.Libvirt, base, name string, edits ...string) string {
	t.Helper()
	require.Zero(t, len(edits)%2, "edits come in pairs")
	tmpl, err := l.DomainLookupByName(base)
	require.NoError(t, err)
	x, err := l.DomainGetXMLDesc(tmpl, libvirt.DomainXMLInactive)
	require.NoError(t, err)
	edits = append([]string{`(?s)<name>.*?</name>`, "<name>" + name + "</name>", `(?s)<uuid>.*?</uuid>`, "",
		`(?s)<metadata>.*?</metadata>`, ""}, edits...) // not the test template's mark
	for i := 0; i < len(edits); i += 2 {
		x = regexp.MustCompile(edits[i]).ReplaceAllLiteralString(x, edits[i+1])
	}
	return x
}

// defineTemplate defines a variant of the test template (see templateVariant) for the
// job to pick, until the test ends.
func (j *gitlabJob) defineTemplate(name string, edits ...string) {
	j.t.Helper()
	dom, err := j.l.DomainDefineXMLFlags(templateVariant(j.t, j.l, name, edits...), 0)
	require.NoError(j.t, err)
	j.t.Cleanup(func() { _ = j.l.DomainUndefine(dom) })
	j.env["CUSTOM_ENV_DISTRO"] = name
}

// gitlabJob is one CI job as GitLab Runner presents it to the custom executor.
type gitlabJob struct {
	t         testing.TB
	l         *libvirt.Libvirt
	dir       string
	prefix    string
	jobID     string
	transport string
	env       map[string]string
	timeout   int // seconds: the job's timeout in its response (runner_info.timeout); 0: 3600
}

// writeResponse writes the job response GitLab Runner would: whose job this is.
func (j *gitlabJob) writeResponse(jobID, projectID, runnerUUID string) {
	j.t.Helper()
	body := fmt.Sprintf(`{"id": %s, "token": "glcbt-test-job-token", "job_info": {"project_id": %s, "project_full_path": "Group/My Project!", "instance_uuid": "e2e-gitlab"}, `+
		`"runner_info": {"uuid": %q, "timeout": %d}, "variables": []}`, jobID, projectID, runnerUUID, cmp.Or(j.timeout, 3600))
	require.NoError(j.t, os.WriteFile(j.env["JOB_RESPONSE_FILE"], []byte(body), 0o600))
}

var notPrefix = regexp.MustCompile(`[^a-z0-9]+`)

// newJob sets up a job whose instances carry a prefix of the test's own, and checks
// after the test that no domain or volume with that prefix is left.
func newJob(t testing.TB) *gitlabJob {
	t.Helper()
	return newJobOver(t, "agent")
}

// transports are the ways a stage can reach the guest; the job suite runs over each.
var transports = []string{"agent", "ssh"}

// overEachTransport runs f as a parallel subtest per transport.
func overEachTransport(t *testing.T, f func(t *testing.T, j *gitlabJob)) {
	for _, tr := range transports {
		t.Run(tr, func(t *testing.T) {
			t.Parallel()
			f(t, newJobOver(t, tr))
		})
	}
}

// newJobOver is newJob with the operator's choice of transport. The host secret for ssh
// keys lives in the job's TMPDIR, so that nothing is written elsewhere.
func newJobOver(t testing.TB, transport string) *gitlabJob {
	t.Helper()
	l := lv(t)
	prefix, id := testPrefix(t)
	jobID := fmt.Sprint(time.Now().UnixNano()%1e9*100 + id)
	j := &gitlabJob{t: t, l: l, dir: t.TempDir(), prefix: prefix, jobID: jobID, transport: transport}
	j.env = map[string]string{
		"LIBVIRT_GCI_URI":             testURI,
		"LIBVIRT_GCI_POOL":            testPool,
		"LIBVIRT_GCI_PREFIX":          prefix,
		"LIBVIRT_GCI_TEMPLATES":       "tiny-*",
		"LIBVIRT_GCI_BOOT_TIMEOUT":    "3m",
		"BUILD_FAILURE_EXIT_CODE":     "1",
		"SYSTEM_FAILURE_EXIT_CODE":    "2",
		"BUILD_EXIT_CODE_FILE":        filepath.Join(j.dir, "exit-code"),
		"JOB_RESPONSE_FILE":           filepath.Join(j.dir, "response.json"),
		"TMPDIR":                      j.dir,
		"CUSTOM_ENV_CI_JOB_ID":        jobID,
		"CUSTOM_ENV_CI_CONCURRENT_ID": "0",
		"CUSTOM_ENV_DISTRO":           testTmpl,
		"LIBVIRT_GCI_TRANSPORT":       transport,
		"LIBVIRT_GCI_SECRET_FILE":     filepath.Join(j.dir, "secret"),
	}
	j.writeResponse(jobID, "77", "e2e-runner")
	// j.l, as a test may reconnect; the prefix made here, as a test may share another's.
	t.Cleanup(func() { assertNothingLeft(t, live(t, j.l), prefix) })
	return j
}

// live is l, or a new connection where libvirtd restarted since l was made.
func live(t testing.TB, l *libvirt.Libvirt) *libvirt.Libvirt {
	if l.IsConnected() {
		return l
	}
	return reconnect(t)
}

// testPrefix is an instance name prefix of the test's own, and a serial number.
func testPrefix(t testing.TB) (string, int64) {
	id := jobSerial.Add(1)
	short := notPrefix.ReplaceAllString(strings.ToLower(strings.TrimPrefix(t.Name(), "Test")), "")
	return fmt.Sprintf("e2e-%.12s%d-", short, id), id
}

// hostEnviron is the test process's environment without any libvirt-gci setting or job
// variable, as the base for a runner's or a stage's environment.
func hostEnviron() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "LIBVIRT_GCI_") && !strings.HasPrefix(kv, "CUSTOM_ENV_") {
			env = append(env, kv)
		}
	}
	return env
}

func (j *gitlabJob) environ() []string {
	env := hostEnviron()
	for k, v := range j.env {
		env = append(env, k+"="+v)
	}
	return env
}

type result struct {
	code           int
	stdout, stderr string
}

// stage runs the binary to completion.
func (j *gitlabJob) stage(args ...string) result {
	j.t.Helper()
	cmd := exec.Command(binPath, args...)
	cmd.Env = j.environ()
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else {
		require.NoError(j.t, err)
	}
	return result{code, out.String(), errb.String()}
}

// script writes a stage script the way the runner does (a file in TMPDIR).
func (j *gitlabJob) script(name, body string) string {
	p := filepath.Join(j.dir, name)
	require.NoError(j.t, os.WriteFile(p, []byte("#!/usr/bin/env bash\nset -eo pipefail\n"+body+"\n"), 0o600))
	return p
}

// run is `run_exec <script> <stage>`.
func (j *gitlabJob) run(stage, body string) result {
	return j.stage("run", j.script(stage+".sh", body), stage)
}

func (j *gitlabJob) instance() string {
	r := j.stage("config")
	require.Equal(j.t, 0, r.code, r.stderr)
	var cfg struct{ Hostname string }
	require.NoError(j.t, json.Unmarshal([]byte(r.stdout), &cfg))
	return cfg.Hostname
}

func (j *gitlabJob) prepare() {
	j.t.Helper()
	r := j.stage("prepare")
	require.Equal(j.t, 0, r.code, "prepare failed:\n%s", r.stderr)
	j.t.Cleanup(func() { j.stage("cleanup") }) // in case the test stops early
}

// leftInGuest is a stage script that lists the files earlier stages left in the guest's
// script locations (the agent's /run/libvirt-gci, ssh's ${TMPDIR:-/tmp}/libvirt-gci.*),
// apart from its own.
const leftInGuest = `self=$(basename "$0" .sh); selfdir=$(dirname "$0")
for f in /run/libvirt-gci/* "${TMPDIR:-/tmp}"/libvirt-gci.*; do
  [ -s "$f" ] || [ -d "$f" ] || continue # emptied files hold nothing of a job's
  case "$f" in "$selfdir"|"$0"|"$0".pid|/run/libvirt-gci/"$self".*) ;; *) echo "left: $f" ;; esac
done`

// leftovers lists domains, volumes and what networks hold (host entries, leases) whose
// names start with prefix, once the removals that jobs' cleanups left to finishers are
// over (a bounded wait).
func leftovers(t testing.TB, l *libvirt.Libvirt, prefix string) []string {
	t.Helper()
	finished(t, l, prefix)
	var left []string
	doms, _, err := l.ConnectListAllDomains(1, 0)
	require.NoError(t, err)
	for _, d := range doms {
		if strings.HasPrefix(d.Name, prefix) {
			left = append(left, "domain "+d.Name)
		}
	}
	pool, err := l.StoragePoolLookupByName(testPool)
	require.NoError(t, err)
	vols, _, err := l.StoragePoolListAllVolumes(pool, 1, 0)
	require.NoError(t, err)
	for _, v := range vols {
		if strings.HasPrefix(v.Name, prefix) {
			left = append(left, "volume "+v.Name)
		}
	}
	// And on disk, in case something bypassed libvirt's bookkeeping.
	px, err := l.StoragePoolGetXMLDesc(pool, 0)
	require.NoError(t, err)
	m := regexp.MustCompile(`(?s)<target>\s*<path>([^<]+)</path>`).FindStringSubmatch(px)
	require.NotNil(t, m, "pool %s has no target path", testPool)
	files, err := filepath.Glob(filepath.Join(m[1], prefix+"*"))
	require.NoError(t, err)
	for _, f := range files {
		left = append(left, "file "+f)
	}
	// And what libvirt's networks hold for them: host entries, leases.
	nets, _, err := l.ConnectListAllNetworks(1, libvirt.ConnectListNetworksActive)
	require.NoError(t, err)
	for _, n := range nets {
		for _, h := range networkHolds(t, l, n.Name, prefix) {
			left = append(left, "network "+n.Name+": "+h)
		}
	}
	return left
}

// finished waits, a minute at most, until no instance whose name starts with prefix is
// marked ending (a job's cleanup paused it and left its removal to a finisher).
func finished(t testing.TB, l *libvirt.Libvirt, prefix string) {
	t.Helper()
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(50 * time.Millisecond) {
		doms, _, err := l.ConnectListAllDomains(1, 0)
		require.NoError(t, err)
		ending := ""
		for _, d := range doms {
			if !strings.HasPrefix(d.Name, prefix) { // others' XML costs a busy libvirtd calls
				continue
			}
			if x, err := l.DomainGetXMLDesc(d, 0); err == nil && strings.Contains(x, "ending-at>") {
				ending = d.Name
			}
		}
		if ending == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("the finisher of %s did not remove it in a minute", ending)
			return
		}
	}
}

func assertNothingLeft(t testing.TB, l *libvirt.Libvirt, prefix string) {
	t.Helper()
	assert.Empty(t, leftovers(t, l, prefix), "instances or volumes left behind")
}

// cacheDir is a LIBVIRT_GCI_CACHE_DIR for the test, in a directory others may enter (as
// /var/cache is). The shares' file systems that prepare mounts there are unmounted when
// the test ends.
func cacheDir(t testing.TB) string {
	t.Helper()
	base := t.TempDir()
	require.NoError(t, os.Chmod(base, 0o755))
	dir := filepath.Join(base, "cache")
	require.NoError(t, os.Mkdir(dir, 0o755))
	t.Cleanup(func() {
		for m := range mountsBelow(t, dir) {
			if out, err := exec.Command("umount", "--lazy", m).CombinedOutput(); err != nil {
				t.Errorf("umount %s: %v: %s", m, err, out)
			}
		}
	})
	return dir
}

// mountsBelow are the mount points below dir, with their options.
func mountsBelow(t testing.TB, dir string) map[string]string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	require.NoError(t, err)
	out := map[string]string{}
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) > 5 && strings.HasPrefix(f[4], dir+"/") {
			out[f[4]] = f[5]
		}
	}
	return out
}
