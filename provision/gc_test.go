package provision

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/libvirt-gci/libvirt-gci/provision/meta"
	"github.com/libvirt-gci/libvirt-gci/provision/provisiontest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestOrphaned(t *testing.T) {
	t.Parallel()
	if _, err := os.Stat(machineIDFile); err != nil {
		t.Skip("no /etc/machine-id")
	}
	me := &meta.Process{MachineID: readTrimmed(machineIDFile), BootID: readTrimmed(bootIDFile), PID: os.Getpid(), Start: processStart(os.Getpid())}
	require.NotZero(t, me.Start)
	assert.Empty(t, gone(me, "the runner"), "a live process")
	assert.Empty(t, gone(nil, "the runner"), "made by hand: age alone decides")

	cmd := exec.Command("true")
	require.NoError(t, cmd.Run())
	dead := *me
	dead.PID = cmd.Process.Pid
	assert.Contains(t, gone(&dead, "the runner"), "is gone")
	reused := *me
	reused.Start++
	assert.Contains(t, gone(&reused, "the runner"), "is gone", "a PID taken by another process")
	rebooted := *me
	rebooted.BootID = "another-boot"
	assert.Equal(t, "the host rebooted after its prepare", gone(&rebooted, "the runner"))
	elsewhere := dead
	elsewhere.MachineID = "another-host"
	assert.Empty(t, gone(&elsewhere, "the runner"), "another host's runner is not ours to judge")
}

// An instance whose prepare died before it was ready (kill -9; a define that landed
// after its cleanup looked) is an orphan, whatever its runner does; once ready, only
// its runner's end makes it one (issue 24).
func TestOrphanedPrepare(t *testing.T) {
	t.Parallel()
	if _, err := os.Stat(machineIDFile); err != nil {
		t.Skip("no /etc/machine-id")
	}
	me := &meta.Process{MachineID: readTrimmed(machineIDFile), BootID: readTrimmed(bootIDFile), PID: os.Getpid(), Start: processStart(os.Getpid())}
	cmd := exec.Command("true")
	require.NoError(t, cmd.Run())
	dead := *me
	dead.PID = cmd.Process.Pid

	m := meta.Metadata{Process: me, Prepare: &dead}
	assert.Equal(t, fmt.Sprintf("its prepare (pid %d) is gone before the instance was ready", dead.PID), orphaned(m), "the runner lives on")
	m.ReadyAt = "2026-12-05T10:00:00Z"
	assert.Empty(t, orphaned(m), "ready: its runner's cleanup will come")
	m = meta.Metadata{Process: me, Prepare: me}
	assert.Empty(t, orphaned(m), "a prepare at work")
	m = meta.Metadata{Prepare: &dead}
	assert.NotEmpty(t, orphaned(m), "by hand (no runner) too")
	m = meta.Metadata{Process: &dead, Prepare: me, ReadyAt: "x"}
	assert.Contains(t, orphaned(m), "the runner that prepared it")
}

// A launch marks its instance ready last, and gc keeps such an instance while its runner
// lives; an instance left unready by a prepare that died goes at the next sweep.
func TestLaunchMarksReady(t *testing.T) {
	t.Parallel()
	f := provisiontest.New("ci")
	var log bytes.Buffer
	h := readyHost(t, f, &log, time.Minute)
	req := launchReq("gci-a")
	req.Process = ProcessOf(os.Getpid())
	require.NoError(t, h.Launch(context.Background(), req))
	conn := NewConn(f)
	in, err := conn.Lookup("gci-a")
	require.NoError(t, err)
	assert.NotEmpty(t, in.Metadata.ReadyAt)
	require.NotNil(t, in.Metadata.Prepare)
	assert.Equal(t, os.Getpid(), in.Metadata.Prepare.PID)

	// gci-a's prepare died before ready: as if the mark had never been written.
	cmd := exec.Command("true")
	require.NoError(t, cmd.Run())
	m := in.Metadata
	m.ReadyAt, m.Prepare.PID = "", cmd.Process.Pid
	require.NoError(t, conn.SetMetadata("gci-a", m))
	// The next launch's sweep removes it, in a log that is another job's: counted, not
	// named (issue 24: the name is another project's business).
	log.Reset()
	require.NoError(t, h.Launch(context.Background(), launchReq("gci-b")))
	assert.Contains(t, log.String(), "swept 1 orphaned instances")
	assert.NotContains(t, log.String(), "gci-a")
	_, err = conn.Lookup("gci-a")
	assert.ErrorIs(t, err, ErrNoInstance)

	// gc, the operator's, names what it removes.
	in, err = conn.Lookup("gci-b")
	require.NoError(t, err)
	m = in.Metadata
	m.ReadyAt, m.Prepare.PID = "", cmd.Process.Pid
	require.NoError(t, conn.SetMetadata("gci-b", m))
	sw, err := h.GC(context.Background(), false, 0)
	require.NoError(t, err)
	assert.Equal(t, 1, sw.Removed)
	assert.Contains(t, log.String(), fmt.Sprintf("gc: removed gci-b: its prepare (pid %d) is gone before the instance was ready", cmd.Process.Pid))
}

// A launch's sweep is bounded, but always removes one orphan even when its budget was
// spent before it began (a busy host, a slow listing): orphans go one launch at a time.
func TestSweepAlwaysRemovesOne(t *testing.T) {
	old := sweepTime
	sweepTime = time.Nanosecond
	t.Cleanup(func() { sweepTime = old })
	f := provisiontest.New("ci")
	var log bytes.Buffer
	h := readyHost(t, f, &log, time.Minute)
	conn := NewConn(f)
	dead := exec.Command("true")
	require.NoError(t, dead.Run())
	for _, name := range []string{"gci-a", "gci-b"} {
		req := launchReq(name)
		req.Process = ProcessOf(os.Getpid())
		require.NoError(t, h.Launch(context.Background(), req))
	}
	for _, name := range []string{"gci-a", "gci-b"} {
		in, err := conn.Lookup(name)
		require.NoError(t, err)
		m := in.Metadata
		m.Process.PID = dead.Process.Pid // its runner died
		require.NoError(t, conn.SetMetadata(name, m))
	}
	left := func() (n int) {
		for _, name := range []string{"gci-a", "gci-b"} {
			if _, err := conn.Lookup(name); err == nil {
				n++
			}
		}
		return n
	}
	require.NoError(t, h.Launch(context.Background(), launchReq("gci-c")))
	assert.Equal(t, 1, left(), "one orphan removed, the other left to the next sweep")
	require.NoError(t, h.Launch(context.Background(), launchReq("gci-d")))
	assert.Equal(t, 0, left())
}

// An instance its cleanup ended is its finisher's for a while, even if its runner is
// gone meanwhile; gc removes it once that while is over (the finisher never ran).
func TestGCEnding(t *testing.T) {
	f := provisiontest.New("ci")
	var log bytes.Buffer
	h := readyHost(t, f, &log, time.Minute)
	req := launchReq("gci-a")
	req.Process = ProcessOf(os.Getpid())
	require.NoError(t, h.Launch(context.Background(), req))
	id, err := h.End(context.Background(), "gci-a", nil)
	require.NoError(t, err)
	require.NotEmpty(t, id)

	conn := NewConn(f)
	in, err := conn.Lookup("gci-a")
	require.NoError(t, err)
	m := in.Metadata
	dead := exec.Command("true")
	require.NoError(t, dead.Run())
	m.Process.PID = dead.Process.Pid
	require.NoError(t, conn.SetMetadata("gci-a", m))
	sw, err := h.GC(context.Background(), false, 0)
	require.NoError(t, err)
	assert.Equal(t, 0, sw.Removed, "its finisher is at work")

	m.EndingAt = time.Now().Add(-endingGrace - time.Second).UTC().Format(time.RFC3339)
	require.NoError(t, conn.SetMetadata("gci-a", m))
	sw, err = h.GC(context.Background(), false, 0)
	require.NoError(t, err)
	assert.Equal(t, 1, sw.Removed)
	assert.Contains(t, log.String(), "its removal did not finish")
	id, err = h.End(context.Background(), "gci-a", nil)
	assert.NoError(t, err)
	assert.Empty(t, id, "no such instance")
}

// An instance its cleanup ended does not count against the limits: the next job need
// not wait the moment its finisher takes.
func TestEndingDoesNotCount(t *testing.T) {
	f := provisiontest.New("ci")
	var log bytes.Buffer
	h := readyHost(t, f, &log, time.Minute)
	h.Limits = Limits{Instances: 1}
	require.NoError(t, h.Launch(context.Background(), launchReq("gci-a")))
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	assert.Error(t, h.Launch(ctx, launchReq("gci-b")), "1 of 1 instances in use")
	_, err := h.End(context.Background(), "gci-a", nil)
	require.NoError(t, err)
	ctx, cancel = context.WithTimeout(context.Background(), 500*time.Millisecond) // under the 1 s poll
	defer cancel()
	require.NoError(t, h.Launch(ctx, launchReq("gci-b")))
}

// Issue 38: a job's instance whose cleanup never came (killed, or lost by its runner)
// goes once its job's timeout, from the job response, and LIBVIRT_GCI_JOB_GRACE have
// passed since its prepare, though its runner lives on; a kept one goes by its own
// time, and one by hand has no job timeout.
func TestGCAfterTheJobsTimeout(t *testing.T) {
	t.Parallel()
	f := provisiontest.New("ci")
	var log bytes.Buffer
	h := readyHost(t, f, &log, time.Minute)
	h.JobGrace = time.Minute
	launch := func(name string, timeout time.Duration) {
		req := launchReq(name)
		req.Process = ProcessOf(os.Getpid()) // a runner that lives on
		req.JobTimeout = timeout
		require.NoError(t, h.Launch(context.Background(), req))
	}
	launch("gci-late", time.Second)
	launch("gci-running", time.Hour)
	launch("gci-kept", time.Second)
	launch("gci-byhand", 0)
	conn := NewConn(f)
	backdate := func(name string, keep bool) {
		in, err := conn.Lookup(name)
		require.NoError(t, err)
		m := in.Metadata
		if m.JobDeadline != "" {
			d, err := time.Parse(time.RFC3339, m.JobDeadline)
			require.NoError(t, err)
			m.JobDeadline = d.Add(-2 * time.Minute).Format(time.RFC3339)
		}
		m.CreatedAt = time.Now().Add(-2 * time.Minute).UTC().Format(time.RFC3339)
		if keep {
			m.KeepUntil = time.Now().Add(time.Hour).UTC().Format(time.RFC3339)
		}
		require.NoError(t, conn.SetMetadata(name, m))
	}
	backdate("gci-late", false)
	backdate("gci-running", false)
	backdate("gci-kept", true)
	backdate("gci-byhand", false)
	sw, err := h.GC(context.Background(), false, 0)
	require.NoError(t, err)
	assert.Equal(t, 1, sw.Removed, log.String())
	assert.Regexp(t, `gc: removed gci-late: its job's timeout ended [12]m[0-9]+s ago \(LIBVIRT_GCI_JOB_GRACE 1m0s\): its cleanup never came`, log.String())
	for _, n := range []string{"gci-running", "gci-kept", "gci-byhand"} {
		_, err := conn.Lookup(n)
		assert.NoError(t, err, n)
	}
	_, err = conn.Lookup("gci-late")
	assert.ErrorIs(t, err, ErrNoInstance)
}

// Issue 38 (the soak found it): a cleanup killed between its pause and its finisher's
// start left an ending instance to no one, and gc waited out endingGrace for it. The
// instance records its ender (its cleanup, then its finisher); gc removes one whose
// ender is gone, once enderWait has passed; one whose ender lives is left to it.
func TestGCEndingWhoseEnderIsGone(t *testing.T) {
	t.Parallel()
	f := provisiontest.New("ci")
	var log bytes.Buffer
	h := readyHost(t, f, &log, time.Minute)
	req := launchReq("gci-a")
	req.Process = ProcessOf(os.Getpid())
	require.NoError(t, h.Launch(context.Background(), req))
	_, err := h.End(context.Background(), "gci-a", nil)
	require.NoError(t, err)
	conn := NewConn(f)
	in, err := conn.Lookup("gci-a")
	require.NoError(t, err)
	m := in.Metadata
	require.NotNil(t, m.Ender, "the cleanup recorded itself")
	assert.Equal(t, os.Getpid(), m.Ender.PID)

	m.EndingAt = time.Now().Add(-enderWait - time.Second).UTC().Format(time.RFC3339)
	require.NoError(t, conn.SetMetadata("gci-a", m))
	sw, err := h.GC(context.Background(), false, 0)
	require.NoError(t, err)
	assert.Equal(t, 0, sw.Removed, "its ender lives: left to it")

	dead := exec.Command("true")
	require.NoError(t, dead.Run())
	m.Ender.PID = dead.Process.Pid
	require.NoError(t, conn.SetMetadata("gci-a", m))
	sw, err = h.GC(context.Background(), false, 0)
	require.NoError(t, err)
	assert.Equal(t, 1, sw.Removed)
	assert.Contains(t, log.String(), fmt.Sprintf("and the process removing it (pid %d) is gone before its removal finished", dead.Process.Pid))
}
