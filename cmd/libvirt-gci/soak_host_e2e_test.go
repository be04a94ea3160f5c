package main

// The soak's faults that strike past one job: libvirtd stopped or restarted, the
// runner's service restarted, the host rebooted, the pool's file system full, the job
// network's DHCP range used up, a warm image damaged under a restore. Each is a function
// of its own; what they share (the project's libvirtd script, a small pool, a small
// network) is here too.

import (
	"encoding/json"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/stretchr/testify/require"
)

// libvirtd stops ("stop") or starts ("start") the host's libvirtd with the project's
// own script; a stopped libvirtd's QEMUs go on, as with its service's stop.
func libvirtd(t testing.TB, what string) {
	t.Helper()
	out, err := exec.Command("../../scripts/testenv.sh", "libvirtd", what).CombinedOutput()
	require.NoError(t, err, "libvirtd %s: %s", what, out)
}

// bounceLibvirtd stops libvirtd, leaves it down for down, and starts it again.
func bounceLibvirtd(t testing.TB, down time.Duration) {
	t.Helper()
	libvirtd(t, "stop")
	time.Sleep(down)
	libvirtd(t, "start")
}

// reconnect is a connection to libvirtd again, after a restart, for the rest of the
// test: not closed at its end, as the checks at the end of a job use it after lv's own
// cleanups have run.
func reconnect(t testing.TB) *libvirt.Libvirt {
	t.Helper()
	u, _ := url.Parse(testURI)
	l, err := libvirt.ConnectToURI(u)
	require.NoError(t, err)
	return l
}

// namesLibvirtd says whether a failed stage's output says it lost libvirtd.
func namesLibvirtd(out string) bool { return strings.Contains(out, "libvirtd") }

// libvirtdFault stops libvirtd under one of the job's stages (drawn) for down, starts it
// again, and holds the job to the contract: the stage finishes, or fails with a line
// naming libvirtd; the stages after it run as usual, and the job's cleanup leaves
// nothing once libvirtd is back.
func libvirtdFault(down time.Duration) func(t *testing.T, j *gitlabJob, rng *rand.Rand) (bool, time.Time) {
	return func(t *testing.T, j *gitlabJob, rng *rand.Rand) (bool, time.Time) {
		ok := true
		check := func(what string, code int, out string) {
			if code != 0 && !(code == 2 && namesLibvirtd(out)) {
				ok = false
				t.Logf("%s: %s under a libvirtd restart exited %d without naming libvirtd: %s", j.prefix, what, code, out)
			}
		}
		stages := []string{"prepare", "run", "cleanup"}
		stage := stages[rng.IntN(len(stages))]
		if stage != "prepare" && !soakPrepare(t, j) {
			return false, time.Now()
		}
		var s *started
		switch stage {
		case "prepare":
			s = j.start("prepare")
			time.Sleep(time.Duration(rng.IntN(1500)) * time.Millisecond)
		case "run":
			s = j.start("run", j.script("b.sh", "echo up; sleep 4; echo done"), "build_script")
			s.waitFor("up")
		default:
			s = j.start("cleanup")
			time.Sleep(time.Duration(rng.IntN(300)) * time.Millisecond)
		}
		struck := time.Now()
		bounceLibvirtd(t, down)
		code, _ := s.wait(5 * time.Minute)
		check(stage, code, s.out.String())
		j.l = reconnect(t)
		switch {
		case stage == "cleanup":
			return ok, struck // a failed cleanup's instance is gc's: the runner tries no other
		case stage == "run" && code == 0 && !strings.Contains(s.out.String(), "done"):
			ok = false
			t.Logf("%s: the stage under a libvirtd restart succeeded but its output ended early: %s", j.prefix, s.out.String())
		case stage == "prepare" && code == 0:
			if r := j.run("build_script", "echo ok"); r.code != 0 {
				ok = false
				t.Logf("%s: the stage after a restarted prepare exited %d: %s", j.prefix, r.code, r.stderr)
			}
		}
		return soakCleanup(t, j) && ok, struck
	}
}

// underRunner runs the job's prepare under a process standing for GitLab Runner (which
// the instance records as its runner), and returns that process once the prepare has
// succeeded; nil if it failed.
func underRunner(t *testing.T, j *gitlabJob) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("sh", "-c", `"$0" prepare >&2; echo "prepare-exit=$?"; exec sleep 600`, binPath)
	cmd.Env = j.environ()
	out := &lockedBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	require.NoError(t, cmd.Start())
	for deadline := time.Now().Add(5 * time.Minute); !strings.Contains(out.String(), "prepare-exit="); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			break
		}
	}
	if !strings.Contains(out.String(), "prepare-exit=0") {
		t.Logf("%s: prepare under the runner failed: %s", j.prefix, out.String())
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		_ = cmd.Wait()
		return nil
	}
	return cmd
}

// stopRunner kills the process standing for the runner and every stage it runs, as
// systemd does with a service's cgroup when the service restarts.
func stopRunner(runner *exec.Cmd, stages ...*started) {
	_ = syscall.Kill(-runner.Process.Pid, syscall.SIGKILL)
	_ = runner.Wait()
	for _, s := range stages {
		_ = s.cmd.Process.Kill()
		<-s.exited
	}
}

// runnerRestarted: the runner's service restarts under a running stage; no cleanup
// comes. The next prepare's sweep (or gc) removes the instance: its runner is gone.
func runnerRestarted(t *testing.T, j *gitlabJob, _ *rand.Rand) (bool, time.Time) {
	runner := underRunner(t, j)
	if runner == nil {
		return false, time.Now()
	}
	s := j.start("run", j.script("b.sh", "echo up; sleep 613"), "build_script")
	s.waitFor("up")
	stopRunner(runner, s)
	return true, time.Now()
}

// killQEMU kills the QEMU of the running domain name, as the kernel's OOM killer would.
func killQEMU(name string) error {
	b, err := os.ReadFile("/run/libvirt/qemu/" + name + ".pid")
	if err != nil {
		return fmt.Errorf("the QEMU of %s: %w", name, err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return fmt.Errorf("the QEMU of %s: %w", name, err)
	}
	return syscall.Kill(pid, syscall.SIGKILL)
}

// killQEMUs kills the QEMU of every running domain whose name starts with prefix.
func killQEMUs(prefix string) {
	pids, _ := filepath.Glob("/run/libvirt/qemu/" + prefix + "*.pid")
	for _, p := range pids {
		_ = killQEMU(strings.TrimSuffix(filepath.Base(p), ".pid"))
	}
}

// hostReboots plays a host's reboot under a running job, as far as one machine can:
// the runner and its stages gone, every QEMU of the soak killed, libvirtd restarted.
// Then the next job (no operator in between) must run, and its prepare leave nothing
// of the dead one.
func hostReboots(t *testing.T, j *gitlabJob, _ *rand.Rand) (bool, time.Time) {
	runner := underRunner(t, j)
	if runner == nil {
		return false, time.Now()
	}
	s := j.start("run", j.script("b.sh", "echo up; sleep 613"), "build_script")
	s.waitFor("up")
	struck := time.Now()
	stopRunner(runner, s)
	killQEMUs(j.prefix)
	bounceLibvirtd(t, 0)
	j.l = reconnect(t)
	return j.nextJobRuns(t, nil), struck
}

// nextJobRuns says whether the next job of j's project (with j's settings, changed by
// change if not nil) runs: prepare, a stage, cleanup.
func (j *gitlabJob) nextJobRuns(t *testing.T, change func(env map[string]string)) bool {
	next := j.sibling()
	if change != nil {
		change(next.env)
	}
	if !soakPrepare(t, next) {
		return false
	}
	if r := next.run("build_script", "echo ok"); r.code != 0 {
		t.Logf("%s: the next job's stage exited %d: %s", next.prefix, r.code, r.stderr)
		return false
	}
	return soakCleanup(t, next)
}

// sibling is the next job of the same project with j's settings: another job ID, its
// own directory (TMPDIR, job response, exit code file).
func (j *gitlabJob) sibling() *gitlabJob {
	n := newJobOver(j.t, j.transport)
	own := maps.Clone(n.env)
	n.prefix, n.env, n.timeout = j.prefix, maps.Clone(j.env), j.timeout
	for _, k := range []string{"TMPDIR", "JOB_RESPONSE_FILE", "BUILD_EXIT_CODE_FILE", "CUSTOM_ENV_CI_JOB_ID"} {
		n.env[k] = own[k]
	}
	n.writeResponse(n.jobID, "77", "e2e-runner")
	return n
}

// finisherKilled: the process a cleanup leaves to remove its paused VM is killed. gc
// removes the instance once its ender is gone (the next prepare's sweep, or gc's timer).
func finisherKilled(t *testing.T, j *gitlabJob, _ *rand.Rand) (bool, time.Time) {
	if !soakPrepare(t, j) {
		return false, time.Now()
	}
	name := j.instance()
	s := j.start("cleanup")
	struck := time.Now()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if pid := finisherOf(name); pid > 0 {
			_ = syscall.Kill(pid, syscall.SIGKILL)
			struck = time.Now()
			break
		}
	}
	code, _ := s.wait(time.Minute)
	if code != 0 {
		t.Logf("%s: cleanup exited %d: %s", j.prefix, code, s.out.String())
	}
	return code == 0, struck
}

// finisherOf is the pid of `libvirt-gci finish NAME ...`, or 0.
func finisherOf(name string) int {
	cmdlines, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range cmdlines {
		b, _ := os.ReadFile(p)
		if f := strings.Split(string(b), "\x00"); len(f) > 2 && f[1] == "finish" && f[2] == name {
			pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(p)))
			return pid
		}
	}
	return 0
}

// smallPool is a storage pool on a file system of its own, a loop device of size MiB,
// made once per test binary and removed when it ends. Its name is returned.
var smallPool = sync.OnceValues(func() (string, error) {
	name := fmt.Sprintf("gci-e2e-small-%d", os.Getpid())
	dir := "/var/lib/libvirt-gci/" + name
	img := dir + ".img"
	steps := [][]string{
		{"truncate", "-s", "400M", img},
		{"mkfs.ext4", "-q", "-F", img},
		{"mkdir", "-p", dir},
		{"mount", "-o", "loop", img, dir},
		{"virsh", "-q", "-c", testURI, "pool-create-as", name, "dir", "--target", dir},
	}
	addCleanup(func() {
		_ = exec.Command("virsh", "-q", "-c", testURI, "pool-destroy", name).Run()
		_ = exec.Command("umount", dir).Run()
		_ = os.Remove(dir)
		_ = os.Remove(img)
	})
	for _, s := range steps {
		if out, err := exec.Command(s[0], s[1:]...).CombinedOutput(); err != nil {
			return "", fmt.Errorf("%s: %v: %s", strings.Join(s, " "), err, out)
		}
	}
	return name, nil
})

var poolFullMu sync.Mutex // one job at a time fills the small pool

// poolFull: the pool's file system fills up under a running job (something else on the
// host wrote it full; the disk reserve is off). The guest's next write cannot be stored:
// the stage must fail as a system failure that says so, within a minute, not hang.
func poolFull(t *testing.T, j *gitlabJob, _ *rand.Rand) (bool, time.Time) {
	pool, err := smallPool()
	require.NoError(t, err)
	poolFullMu.Lock()
	defer poolFullMu.Unlock()
	j.env["LIBVIRT_GCI_POOL"], j.env["LIBVIRT_GCI_START"], j.env["LIBVIRT_GCI_DISK_RESERVE"] = pool, "boot", "0"
	if !soakPrepare(t, j) {
		return false, time.Now()
	}
	dir := "/var/lib/libvirt-gci/" + pool
	filler := filepath.Join(dir, "filler")
	defer os.Remove(filler)
	out, err := exec.Command("sh", "-c", `dd if=/dev/zero of="$0" bs=1M status=none 2>/dev/null; sync`, filler).CombinedOutput()
	_ = err // dd ends with "No space left on device"
	struck := time.Now()
	s := j.start("run", j.script("b.sh", "echo up; head -c 67108864 /dev/urandom >/var/fill; sync; echo wrote"), "build_script")
	code, _ := s.wait(2 * time.Minute)
	ok := code == 2 && strings.Contains(s.out.String(), "full")
	if !ok {
		t.Logf("%s: a stage writing to a full pool exited %d: %s (filler: %s)", j.prefix, code, s.out.String(), out)
	}
	_ = os.Remove(filler)
	return soakCleanup(t, j) && ok, struck
}

var rangeMu sync.Mutex // one job at a time on the small network

// smallNetwork is an isolated network with a DHCP range of one address, made once per
// test binary and removed when it ends. It returns its name.
func smallNetwork(t *testing.T, l *libvirt.Libvirt) string {
	t.Helper()
	smallNetOnce.Do(func() {
		id := os.Getpid() % 10000
		smallNet = fmt.Sprintf("gci-e2e-one-%d", id)
		x := fmt.Sprintf(`<network><name>%s</name><bridge name='gci-one-%d' stp='off'/><dns enable='no'/>
<ip address='10.213.217.1' prefix='24'><dhcp><range start='10.213.217.10' end='10.213.217.10'/></dhcp></ip></network>`, smallNet, id)
		n, err := l.NetworkDefineXML(x)
		require.NoError(t, err)
		require.NoError(t, l.NetworkCreate(n))
		addCleanup(func() {
			_ = exec.Command("virsh", "-q", "-c", testURI, "net-destroy", smallNet).Run()
			_ = exec.Command("virsh", "-q", "-c", testURI, "net-undefine", smallNet).Run()
		})
	})
	return smallNet
}

var (
	smallNetOnce sync.Once
	smallNet     string
)

// rangeUsedUp: every address of the job network's DHCP range is held (by a host entry
// of someone else's). The prepare fails as a system failure naming the network, leaving
// nothing; once an address is free again, the next job on that network runs.
func rangeUsedUp(t *testing.T, j *gitlabJob, _ *rand.Rand) (bool, time.Time) {
	netName := smallNetwork(t, j.l)
	rangeMu.Lock()
	defer rangeMu.Unlock()
	// A template of the job's own on that network: undefined when the job is over, so
	// that its warm image (made by the job after the fault) is one of a gone template.
	tmpl := "e2e-one-" + j.jobID
	dom, err := j.l.DomainDefineXMLFlags(templateVariantOf(t, j.l, testNICTmpl, tmpl, `<source network='gci-isolated'/>`, "<source network='"+netName+"'/>"), 0)
	require.NoError(t, err)
	defer func() { _ = j.l.DomainUndefine(dom) }()
	j.env["CUSTOM_ENV_DISTRO"], j.env["LIBVIRT_GCI_TEMPLATES"], j.env["LIBVIRT_GCI_START"] = tmpl, tmpl, "boot"
	n, err := j.l.NetworkLookupByName(netName)
	require.NoError(t, err)
	// Not named by the soak's prefix: the sweep gives back its strays' host entries.
	host := fmt.Sprintf("<host mac='52:54:00:ee:%02x:01' name='filler-%d' ip='10.213.217.10'/>", rand.IntN(256), os.Getpid())
	require.NoError(t, j.l.NetworkUpdateCompat(n, libvirt.NetworkUpdateCommandAddLast, libvirt.NetworkSectionIPDhcpHost, -1, host, libvirt.NetworkUpdateAffectLive))
	struck := time.Now()
	r := j.stage("prepare")
	ok := r.code == 2 && strings.Contains(r.stderr, "no free address")
	if !ok {
		t.Logf("%s: prepare on a used-up network exited %d: %s", j.prefix, r.code, r.stderr)
	}
	ok = soakCleanup(t, j) && ok
	require.NoError(t, j.l.NetworkUpdateCompat(n, libvirt.NetworkUpdateCommandDelete, libvirt.NetworkSectionIPDhcpHost, -1, host, libvirt.NetworkUpdateAffectLive))
	// The next job is restored: its warm image is made first.
	return j.nextJobRuns(t, func(env map[string]string) { delete(env, "LIBVIRT_GCI_START") }) && ok, struck
}

// warmDamaged: the warm image a prepare restores from is deleted or truncated, before
// the prepare or while it restores. The prepare succeeds (it boots instead) or fails as
// a system failure saying so; the damaged image is not used again, and the next job runs.
func warmDamaged(t *testing.T, j *gitlabJob, rng *rand.Rand) (bool, time.Time) {
	saves := warmSavesOf(t, j.l, j.env["CUSTOM_ENV_DISTRO"])
	// The template's other warm images (other profiles) are damaged too, and no prepare
	// of this job finds them so: unmarked at the end, as a prepare that found them would,
	// so that later jobs and tests restore from images made again.
	defer func() {
		for _, f := range saves {
			_ = exec.Command("virsh", "-q", "-c", testURI, "vol-delete", "--pool", testPool, strings.TrimSuffix(filepath.Base(f), ".save")+".done").Run()
		}
	}()
	damage := func() {
		for _, f := range saves {
			if rng.IntN(2) == 0 {
				_ = os.Remove(f)
			} else {
				_ = os.Truncate(f, 4096+rng.Int64N(1<<20))
			}
		}
	}
	struck := make(chan time.Time, 1)
	if rng.IntN(2) == 0 {
		damage()
		struck <- time.Now()
	} else {
		wait := time.Duration(rng.IntN(800)) * time.Millisecond
		go func() {
			time.Sleep(wait)
			damage()
			struck <- time.Now()
		}()
	}
	r := j.stage("prepare")
	ok := r.code == 0 || (r.code == 2 && strings.Contains(r.stderr, "warm image"))
	if !ok {
		t.Logf("%s: prepare from a damaged warm image exited %d: %s", j.prefix, r.code, r.stderr)
	}
	if r.code == 0 {
		if rr := j.run("build_script", "echo ok"); rr.code != 0 {
			ok = false
			t.Logf("%s: the stage after a damaged warm image exited %d: %s", j.prefix, rr.code, rr.stderr)
		}
	}
	return soakCleanup(t, j) && ok, <-struck
}

// warmSavesOf lists the save files of the warm images of the template tmpl: those whose
// disk overlays are backed by the template's disk.
func warmSavesOf(t *testing.T, l *libvirt.Libvirt, tmpl string) []string {
	t.Helper()
	dom, err := l.DomainLookupByName(tmpl)
	require.NoError(t, err)
	x, err := l.DomainGetXMLDesc(dom, libvirt.DomainXMLInactive)
	require.NoError(t, err)
	var out []string
	overlays, _ := filepath.Glob("/var/lib/libvirt-gci/pool-" + testPool + "/libvirt-gci-warm-*.qcow2")
	for _, o := range overlays {
		b, err := exec.Command("qemu-img", "info", "-U", "--output=json", o).Output()
		if err != nil {
			continue
		}
		var info struct {
			Backing string `json:"full-backing-filename"`
		}
		if json.Unmarshal(b, &info) == nil && info.Backing != "" && strings.Contains(x, "'"+info.Backing+"'") {
			name := strings.TrimSuffix(o, ".qcow2")
			name = name[:strings.LastIndexByte(name, '-')]
			out = append(out, name+".save")
		}
	}
	return out
}

// goneTemplateImages lists the warm images in the test pool whose template (named in
// their save image's header) is no longer defined.
func goneTemplateImages(t *testing.T, l *libvirt.Libvirt) []string {
	t.Helper()
	saves, _ := filepath.Glob("/var/lib/libvirt-gci/pool-" + testPool + "/libvirt-gci-warm-*.save")
	var out []string
	for _, f := range saves {
		b, err := exec.Command("virsh", "-q", "-c", testURI, "save-image-dumpxml", f).Output()
		if err != nil {
			continue
		}
		m := regexp.MustCompile(`<(?:\w+:)?template>([^<]+)</(?:\w+:)?template>`).FindSubmatch(b)
		if m == nil {
			continue
		}
		if _, err := l.DomainLookupByName(string(m[1])); err != nil {
			out = append(out, filepath.Base(f)+" of "+string(m[1]))
		}
	}
	return out
}

// poolLocks lists the lock volumes in the test pool.
func poolLocks(t *testing.T, l *libvirt.Libvirt) []string {
	t.Helper()
	pool, err := l.StoragePoolLookupByName(testPool)
	require.NoError(t, err)
	vols, _, err := l.StoragePoolListAllVolumes(pool, 1, 0)
	require.NoError(t, err)
	var out []string
	for _, v := range vols {
		if strings.HasSuffix(v.Name, ".lock") {
			out = append(out, v.Name)
		}
	}
	return out
}
