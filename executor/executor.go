// Package executor is the GitLab Runner custom-executor protocol: the config, prepare, run
// and cleanup stages, what they read from the job, and how they end.
package executor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/libvirt-gci/libvirt-gci/provision"
	"github.com/libvirt-gci/libvirt-gci/provision/meta"
)

// Paths inside the guest, reported to the runner by config.
const (
	BuildsDir = "/builds"
	CacheDir  = "/cache"
)

// Executor runs the stages. Stdout and Stderr carry the job's output; Log the tool's own.
type Executor struct {
	Settings Settings
	// Dial connects to libvirt; nil is provision.Connect to Settings.URI. Tests give
	// provisiontest's fake here.
	Dial    func(ctx context.Context, uri string) (*provision.Conn, error)
	Version string
	// Mounter mounts the cache shares' file systems; nil is the host's (mkfs.ext4 and
	// mount -o loop). Tests give a fake.
	Mounter Mounter
	Log     *slog.Logger
	Stdout  io.Writer
	Stderr  io.Writer
	// Detach starts, in a process of its own that outlives this one, `finish NAME
	// PREPARE_ID` (Finish): a job's cleanup returns once its instance is paused for good
	// and leaves the rest of the removal to it. nil: cleanup removes the instance itself.
	Detach func(name, prepareID string) error
}

// helper is the gitlab-runner binary to give the instance (LIBVIRT_GCI_RUNNER_BINARY),
// or "". By default it is the runner that drives the job: the process that started this
// stage, if it is a gitlab-runner; by hand, none.
func (e *Executor) helper(t Target) string {
	switch e.Settings.RunnerBinary {
	case "none":
		if !t.ByHand {
			e.Log.Info("the guest gets no gitlab-runner (LIBVIRT_GCI_RUNNER_BINARY=none): the artifact and cache stages need one in the template")
		}
		return ""
	case "auto":
		if t.ByHand {
			return ""
		}
		// The link names the file; opening the link itself reads the very binary that
		// runs, even if an upgrade has replaced the file since.
		exe := fmt.Sprintf("/proc/%d/exe", os.Getppid())
		target, err := os.Readlink(exe)
		if err != nil || !strings.HasPrefix(filepath.Base(target), "gitlab-runner") {
			e.Log.Debug(fmt.Sprintf("no gitlab-runner helper: the process that started prepare is %q, not a gitlab-runner (LIBVIRT_GCI_RUNNER_BINARY names one)", target))
			return ""
		}
		return exe
	}
	return e.Settings.RunnerBinary
}

// Target names the instance a stage works on: a job's, or one named by hand.
type Target struct {
	Name   string
	Owner  meta.Owner
	ByHand bool // named with --machine by the operator: any instance of ours will do
	// Protected: the job runs for a protected ref (git_info.protected in the job
	// response; false where GitLab does not say). Its cache is kept apart.
	Protected bool
	// JobTimeout is the job's timeout from the job response; 0 by hand.
	JobTimeout time.Duration
}

// TargetFor derives the instance from --machine, or else from the job response GitLab
// Runner wrote (responseFile, from the runner's unprefixed JOB_RESPONSE_FILE).
func (e *Executor) TargetFor(machine, responseFile string) (Target, error) {
	if machine != "" {
		if err := CheckMachineName(machine); err != nil {
			return Target{}, err
		}
		return Target{Name: machine, Owner: meta.Owner{Manual: true}, ByHand: true}, nil
	}
	if responseFile == "" {
		return Target{}, &InputError{"no instance given: use --machine NAME, or run under GitLab Runner (JOB_RESPONSE_FILE is not set)"}
	}
	id, err := ReadIdentity(responseFile)
	if err != nil {
		return Target{}, err
	}
	name, err := InstanceName(e.Settings.Prefix, id.Owner)
	if err != nil {
		return Target{}, err
	}
	return Target{Name: name, Owner: id.Owner, Protected: id.Protected, JobTimeout: id.Timeout}, nil
}

// mine refuses an instance that belongs to someone else. The operator (--machine) may
// act on any.
func (t Target) mine(m meta.Metadata) error {
	if t.ByHand || sameOwner(m.Owner, t.Owner) {
		return nil
	}
	return fmt.Errorf("instance %q belongs to %s, not to %s; leaving it alone", t.Name, ownerString(m.Owner), ownerString(t.Owner))
}

// Config prints the custom executor's configuration JSON, and nothing else, on stdout.
func (e *Executor) Config(t Target) error {
	cfg := map[string]any{
		"builds_dir":           BuildsDir,
		"cache_dir":            CacheDir,
		"builds_dir_is_shared": false,
		"hostname":             t.Name,
		"driver":               map[string]string{"name": "libvirt-gci", "version": e.Version},
		"shell":                "bash",
	}
	return json.NewEncoder(e.Stdout).Encode(cfg)
}

// Prepare clones the template into a new instance, boots it and waits until the guest
// answers over the transport. On any failure it removes what it created.
func (e *Executor) Prepare(ctx context.Context, t Target, choice Choice, size Size) error {
	req := provision.Request{
		Name: t.Name, Template: choice.Name, Offered: choice.Listed, Owner: t.Owner, Size: size, Transport: e.Settings.Transport,
		// GitLab retries prepare after a cleanup, but a crash can leave an instance behind:
		// ours is removed, anyone else's left alone. By hand too: a prepare never replaces
		// a job's instance.
		Replace:    Target{Name: t.Name, Owner: t.Owner}.mine,
		JobTimeout: t.JobTimeout,
	}
	if !t.ByHand {
		req.Process = provision.ProcessOf(os.Getppid()) // GitLab Runner, for gc
	}
	if e.Settings.CacheDir != "" && !t.ByHand {
		dir, err := e.cacheShare(ctx, t)
		if err != nil {
			return err
		}
		req.Cache, req.CacheMount = dir, CacheDir
	}
	h, err := e.place(ctx)
	if err != nil {
		return err
	}
	req.Helper = e.helper(t)
	err = h.Launch(ctx, req)
	var small *provision.DiskTooSmallError
	switch {
	case errors.Is(err, provision.ErrNotOffered):
		msg := fmt.Sprintf("template %q (from %s) is not offered on this runner: no template of that name is marked (libvirt-gci template mark) or matched by LIBVIRT_GCI_TEMPLATES", choice.Name, choice.From)
		if e.Settings.BaseImages.Source != "" {
			// The job's log does not learn the host's directory.
			msg += fmt.Sprintf(", and there is no base image %s.qcow2 in LIBVIRT_GCI_BASE_IMAGES", choice.Name)
		}
		return &InputError{msg}
	case errors.As(err, &small):
		return &InputError{fmt.Sprintf("CUSTOM_ENV_LIBVIRT_GCI_DISK %s is smaller than the template's disk (%s); a disk can only grow", FormatSize(small.Asked), FormatSize(small.Have))}
	}
	return err
}

// Run runs one stage script in the instance with its output streamed live. A script that
// exits non-zero is a BuildFailure, its code written to the runner's BUILD_EXIT_CODE_FILE.
func (e *Executor) Run(ctx context.Context, t Target, scriptPath, stage, exitCodeFile string) error {
	script, err := os.ReadFile(scriptPath)
	if err != nil {
		return fmt.Errorf("read %s script: %w", stage, err)
	}
	h, err := e.locate(ctx, t.Name)
	if err != nil {
		return fmt.Errorf("%s: %w", stage, err)
	}
	sess, err := h.Open(ctx, t.Name, t.mine)
	if errors.Is(err, provision.ErrNoInstance) {
		return fmt.Errorf("%s: %w (was prepare run?)", stage, err)
	}
	if err != nil {
		return fmt.Errorf("%s: %w", stage, err)
	}
	defer sess.Close()
	start := time.Now()
	st, err := sess.Run(ctx, script, e.Stdout, e.Stderr)
	if err != nil {
		return fmt.Errorf("run %s in %s: %w", stage, t.Name, err)
	}
	e.Log.Debug(fmt.Sprintf("%s: %s after %d ms", stage, st, time.Since(start).Milliseconds()))
	if st.Code == 0 {
		return nil
	}
	if exitCodeFile != "" {
		if err := os.WriteFile(exitCodeFile, []byte(strconv.Itoa(st.Code)+"\n"), 0o600); err != nil {
			return fmt.Errorf("write BUILD_EXIT_CODE_FILE: %w", err)
		}
	}
	if e.Settings.KeepFailed > 0 && stage != "after_script" {
		// For cleanup, which keeps the VM of a failed job: it has no other way to know.
		if err := sess.MarkFailed(); err != nil {
			e.Log.Warn(fmt.Sprintf("could not mark %s as failed; cleanup will remove it: %v", t.Name, err))
		}
	}
	return &BuildFailure{Code: st.Code}
}

// Cleanup removes the instance and its volumes. It finishes even after a cancel, and is
// idempotent: a missing or half-made instance is fine.
func (e *Executor) Cleanup(ctx context.Context, t Target) error {
	// Finding the host goes on after a cancel, as the removal does, for AfterCancel.
	lctx, cancel := context.WithCancelCause(context.WithoutCancel(ctx))
	defer cancel(nil)
	stop := context.AfterFunc(ctx, func() {
		time.AfterFunc(provision.AfterCancel, func() { cancel(context.Cause(ctx)) })
	})
	defer stop()
	if e.Settings.CacheDir != "" && !t.ByHand {
		// The job may have changed its share's root (chmod 777 /cache): it gets ours back.
		defer func() {
			if _, err := projectCache(e.Settings.CacheDir, t.Owner, t.Protected); err != nil {
				e.Log.Warn(err.Error())
			}
		}()
	}
	h, err := e.locate(lctx, t.Name)
	if err != nil {
		return err
	}
	// LIBVIRT_GCI_KEEP_FAILED keeps the instance of a failed job; by hand, cleanup
	// --machine removes it.
	if e.Settings.KeepFailed > 0 && !t.ByHand {
		until, why, err := h.Keep(ctx, t.Name, t.mine, e.Settings.KeepFailed)
		if err != nil {
			return err
		}
		if why != "" {
			e.Log.Info(fmt.Sprintf("not keeping %s after the failed job: %s", t.Name, why))
		}
		if !until.IsZero() {
			keep := until.Format(time.RFC3339)
			e.Log.Info(fmt.Sprintf("kept %s after the failed job until %s (LIBVIRT_GCI_KEEP_FAILED): stopped, without its cache and network; "+
				"its disks are the job's work, and the job's code is not to be trusted: look at them read-only (guestfish --ro -d %s), "+
				"and do not start it where it could reach anything; `libvirt-gci cleanup --machine %s` removes it, gc does after that time",
				t.Name, keep, t.Name, t.Name), "name", t.Name, "keep_until", keep)
			return nil
		}
	}
	if e.Detach != nil && !t.ByHand && ctx.Err() == nil {
		// The job's VM can no longer run once paused: the job ends there, and a process
		// of its own removes the VM (gc, if that process never does).
		start := time.Now()
		id, err := h.End(ctx, t.Name, t.mine)
		if err != nil && ctx.Err() != nil {
			return err // cancelled, and End had its time after the cancel: no second try
		}
		if err == nil && id != "" {
			if err = e.Detach(t.Name, id); err == nil {
				e.Log.Info(fmt.Sprintf("stopped %s in %d ms; its removal goes on without the job", t.Name, time.Since(start).Milliseconds()),
					"name", t.Name, "end_ms", time.Since(start).Milliseconds())
				return nil
			}
			e.Log.Warn(fmt.Sprintf("could not leave the removal of %s to a process of its own (%v); removing it now", t.Name, err))
		}
		// Otherwise (no such instance, not ours, libvirt down) the removal says what is
		// wrong, if anything.
	}
	err = h.Remove(ctx, t.Name, t.mine)
	if errors.Is(err, provision.ErrNotManaged) {
		return fmt.Errorf("domain %q was not created by libvirt-gci; refusing to remove it", t.Name)
	}
	return err
}

// Finish removes the instance name a job's cleanup paused and left to this process
// (Detach), if it is still that instance (its prepare ID).
func (e *Executor) Finish(ctx context.Context, name, prepareID string) error {
	if err := CheckMachineName(name); err != nil {
		return err
	}
	h, err := e.locate(ctx, name)
	if err != nil {
		return err
	}
	return h.Finish(ctx, name, prepareID)
}

// GC removes orphaned instances with our prefix (provision.Host.GC).
// With several hosts it sweeps each in turn, past those that are down.
func (e *Executor) GC(ctx context.Context, dryRun bool, olderThan time.Duration) (provision.Sweep, CacheGC, error) {
	var total provision.Sweep
	err := e.hosts().Each(ctx, e.Log, true, func(h *provision.Host) error {
		sw, err := h.GC(ctx, dryRun, olderThan)
		total.Removed += sw.Removed
		total.Kept += sw.Kept
		total.Addresses += sw.Addresses
		total.Warm += sw.Warm
		return err
	})
	caches, cerr := e.gcCaches(ctx, dryRun)
	for _, r := range caches.Removed {
		verb := "removed cache "
		if dryRun {
			verb = "would remove cache "
		}
		e.Log.Info(verb + r)
	}
	return total, caches, errors.Join(err, cerr)
}
