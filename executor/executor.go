// Package executor is the GitLab Runner custom-executor protocol: the config, prepare, run
// and cleanup stages, what they read from the job, and how they end.
package executor

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/libvirt-gci/libvirt-gci/guest"
	"github.com/libvirt-gci/libvirt-gci/provision"
	"github.com/libvirt-gci/libvirt-gci/template"
	"golang.org/x/crypto/ssh"
)

// Paths inside the guest, reported to the runner by config.
const (
	BuildsDir = "/builds"
	CacheDir  = "/cache"
)

// teardownTime bounds a cleanup or a rollback.
const teardownTime = 2 * time.Minute

// reconnectTime is how long a cleanup or a rollback tries to reach libvirtd.
const reconnectTime = 10 * time.Second

// AfterCancel bounds what a stage still does after the runner's SIGTERM: a run stage kills
// its script, reads the last of its output and removes its files; prepare removes what it
// made; cleanup goes on removing. Well under a second on a healthy host; a stalled
// libvirtd or guest gets no more than this, so that every stage exits within 5 s.
const AfterCancel = 4 * time.Second

// lingering returns a context that ends d after ctx does.
func lingering(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	lctx, cancel := context.WithCancelCause(context.WithoutCancel(ctx))
	stop := context.AfterFunc(ctx, func() {
		time.AfterFunc(d, func() { cancel(fmt.Errorf("%w, and %s more passed", context.Cause(ctx), d)) })
	})
	return lctx, func() { stop(); cancel(context.Canceled) }
}

// Executor runs the stages. Stdout and Stderr carry the job's output; Log the tool's own.
type Executor struct {
	Settings Settings
	// Dial connects to libvirt; nil is provision.Connect to Settings.URI. Tests give
	// provisiontest's fake here.
	Dial func(ctx context.Context, uri string) (*provision.Conn, error)
	// Launcher makes the instance; nil is a cold boot (provision.ColdBoot).
	Launcher provision.Launcher
	Version  string
	Log      *slog.Logger
	Stdout   io.Writer
	Stderr   io.Writer
}

// connect connects to the hypervisor.
func (e *Executor) connect(ctx context.Context) (*provision.Conn, error) {
	if e.Dial != nil {
		return e.Dial(ctx, e.Settings.URI)
	}
	return provision.Connect(ctx, e.Settings.URI)
}

// Target names the instance a stage works on: a job's, or one named by hand.
type Target struct {
	Name   string
	Owner  provision.Owner
	ByHand bool // named with --machine by the operator: any instance of ours will do
}

// TargetFor derives the instance from --machine, or else from the job response GitLab
// Runner wrote (responseFile, from the runner's unprefixed JOB_RESPONSE_FILE).
func (e *Executor) TargetFor(machine, responseFile string) (Target, error) {
	if machine != "" {
		if err := CheckMachineName(machine); err != nil {
			return Target{}, err
		}
		return Target{Name: machine, Owner: provision.Owner{Manual: true}, ByHand: true}, nil
	}
	if responseFile == "" {
		return Target{}, &InputError{"no instance given: use --machine NAME, or run under GitLab Runner (JOB_RESPONSE_FILE is not set)"}
	}
	owner, err := ReadIdentity(responseFile)
	if err != nil {
		return Target{}, err
	}
	name, err := InstanceName(e.Settings.Prefix, owner)
	if err != nil {
		return Target{}, err
	}
	return Target{Name: name, Owner: owner}, nil
}

// mine refuses an instance that belongs to someone else. The operator (--machine) may
// act on any.
func (t Target) mine(m provision.Metadata) error {
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

// Prepare clones the template into a new instance, boots it and waits for its guest agent.
// On any failure it removes what it created.
func (e *Executor) Prepare(ctx context.Context, t Target, choice Choice, size Size) (err error) {
	begin := time.Now()
	// The rollback runs after a cancel, but not for long.
	after, cancelAfter := lingering(ctx, AfterCancel)
	defer cancelAfter()
	conn, err := e.connect(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()

	// Orphans of crashed runners go first: they may hold the room this one needs.
	if err := e.sweep(ctx, conn); err != nil {
		return err
	}

	tmplName := choice.Name
	lookupStart := time.Now()
	tx, marked, err := conn.TemplateXML(tmplName)
	e.warnIfSlow("template lookup", tmplName, time.Since(lookupStart))
	if !choice.Listed && !marked && (err == nil || errors.Is(err, provision.ErrNoTemplate) || errors.Is(err, provision.ErrNotTemplate)) {
		// The same answer whether or not such a domain exists: a job learns nothing of
		// the host's other VMs.
		return &InputError{fmt.Sprintf("template %q (from %s) is not offered on this runner: no template of that name is marked (libvirt-gci template mark) or matched by LIBVIRT_GCI_TEMPLATES", tmplName, choice.From)}
	}
	if err != nil {
		return err
	}
	tmpl, err := template.Parse(tx)
	if err != nil {
		return err
	}
	if access := tmpl.HostAccess(); len(access) > 0 && !e.Settings.AllowHostAccess {
		return fmt.Errorf("template %q has %s: through it a job's VM reaches the host or other VMs; remove it from the template, or allow it with LIBVIRT_GCI_ALLOW_HOST_ACCESS=true",
			tmplName, strings.Join(access, ", "))
	}
	if !tmpl.HasAgent {
		return fmt.Errorf("template %q has no guest agent channel; add <channel type='unix'><target type='virtio' name='%s'/></channel> to its devices", tmplName, template.AgentChannel)
	}

	// GitLab retries prepare after a cleanup, but a crash can leave an instance behind:
	// ours is removed, anyone else's left alone. By hand too: a prepare never replaces a
	// job's instance.
	removed, err := conn.Teardown(t.Name, func(m provision.Metadata) error {
		return Target{Name: t.Name, Owner: t.Owner}.mine(m)
	})
	if errors.Is(err, provision.ErrNotManaged) {
		return fmt.Errorf("a domain named %q exists and was not created by libvirt-gci; refusing to replace it", t.Name)
	}
	if err != nil {
		return fmt.Errorf("remove leftover instance %q: %w", t.Name, err)
	}
	if removed.Domain {
		e.Log.Info(fmt.Sprintf("removed leftover instance %s", t.Name))
	}

	if size.Disk > 0 && len(tmpl.Disks) > 0 {
		if have, known, err := conn.BackingCapacity(tmpl.Disks[0].Path); err != nil {
			return err
		} else if known && size.Disk < have {
			return &InputError{fmt.Sprintf("CUSTOM_ENV_LIBVIRT_GCI_DISK %s is smaller than the template's disk (%s); a disk can only grow", FormatSize(size.Disk), FormatSize(have))}
		}
	}
	prepareID := randomHex(8)
	spec, err := e.spec(t, tmpl, prepareID, size)
	if err != nil {
		return err
	}
	memKiB := tmpl.MemoryKiB()
	if size.Memory > 0 {
		memKiB = size.Memory / 1024
	}
	actx, cancelAdmit := e.bootTimeout(ctx)
	release, err := e.admit(actx, conn, memKiB)
	cancelAdmit()
	if err != nil {
		return err
	}
	// From here on, a failure leaves something to remove: what this prepare made, and
	// nothing another prepare of the same name made meanwhile.
	defer func() {
		if err != nil {
			e.rollback(after, t.Name, prepareID)
		}
	}()
	var launcher provision.Launcher = provision.ColdBoot{}
	if e.Launcher != nil {
		launcher = e.Launcher
	}
	tm, err := launcher.Launch(ctx, conn, spec)
	release()
	e.warnIfSlow("define", t.Name, tm.Define)
	if err != nil {
		return err
	}
	sized := ""
	if size != (Size{}) {
		sized = " (" + size.String() + ")"
	}
	e.Log.Info(fmt.Sprintf("cloned %s into %s%s in %d ms (define %d ms, %d overlays %d ms), started in %d ms",
		tmplName, t.Name, sized, (tm.Define+tm.Clone).Milliseconds(), tm.Define.Milliseconds(), len(spec.Volumes), tm.Clone.Milliseconds(), tm.Start.Milliseconds()),
		"template", tmplName, "name", t.Name, "define_ms", tm.Define.Milliseconds(), "clone_ms", tm.Clone.Milliseconds(), "start_ms", tm.Start.Milliseconds(),
		"cpus", size.CPUs, "memory", size.Memory, "disk", size.Disk)

	agent, err := guest.NewAgent(conn.API(), t.Name)
	if err != nil {
		return err
	}
	bootStart := time.Now()
	bctx, cancel := e.bootTimeout(ctx)
	defer cancel()
	bctx, cancelLoss := conn.WithLoss(bctx)
	defer cancelLoss()
	if err := agent.WaitReady(bctx); err != nil {
		if errors.Is(context.Cause(bctx), provision.ErrLost) {
			return fmt.Errorf("instance %q: waiting for its guest agent: %w", t.Name, provision.ErrLost)
		}
		return fmt.Errorf("instance %q: %w", t.Name, err)
	}
	if e.Settings.Transport != TransportSSH {
		e.Log.Info(fmt.Sprintf("guest agent ready after %.1f s; prepared %s in %.1f s", time.Since(bootStart).Seconds(), t.Name, time.Since(begin).Seconds()),
			"agent_ready_ms", time.Since(bootStart).Milliseconds(), "prepare_ms", time.Since(begin).Milliseconds())
		return nil
	}
	e.Log.Info(fmt.Sprintf("guest agent ready after %.1f s", time.Since(bootStart).Seconds()), "agent_ready_ms", time.Since(bootStart).Milliseconds())
	sshStart := time.Now()
	if err := e.prepareSSH(bctx, conn, agent, t.Name); err != nil {
		return fmt.Errorf("instance %q: %w", t.Name, err)
	}
	e.Log.Info(fmt.Sprintf("ssh ready after %.1f s more; prepared %s in %.1f s", time.Since(sshStart).Seconds(), t.Name, time.Since(begin).Seconds()),
		"ssh_ready_ms", time.Since(sshStart).Milliseconds(), "prepare_ms", time.Since(begin).Milliseconds())
	return nil
}

// bootTimeout bounds a wait of prepare's (for capacity, for the guest) by
// LIBVIRT_GCI_BOOT_TIMEOUT, and says so when it ends.
func (e *Executor) bootTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeoutCause(ctx, e.Settings.BootTimeout, fmt.Errorf("boot timeout %s (LIBVIRT_GCI_BOOT_TIMEOUT) passed", e.Settings.BootTimeout))
}

// warnIfSlow says so when a libvirt call that takes milliseconds on a healthy host took
// seconds, and why that usually is.
func (e *Executor) warnIfSlow(call, name string, took time.Duration) {
	if took < provision.SlowCall {
		return
	}
	e.Log.Warn(fmt.Sprintf("libvirt took %.1f s for the %s of %s: %s", took.Seconds(), call, name, provision.SlowHint(e.Settings.URI)),
		"call", call, "ms", took.Milliseconds())
}

// prepareSSH makes the instance reachable over SSH: it authorizes the instance's own
// client key in the guest, gives the guest a fresh host key and pins it, records the
// forwarded port in the metadata, and waits for an authenticated session.
func (e *Executor) prepareSSH(ctx context.Context, conn *provision.Conn, agent *guest.Agent, name string) error {
	inst, err := conn.Lookup(name)
	if err != nil {
		return err
	}
	port, err := conn.ForwardedPort(name, 22)
	if err != nil {
		return err
	}
	key, err := e.clientKey(inst, true)
	if err != nil {
		return err
	}
	hostKey, err := agent.SetupSSH(ctx, e.Settings.SSHUser, guest.AuthorizedKey(key.PublicKey(), "libvirt-gci@"+name))
	if err != nil {
		return err
	}
	m := inst.Metadata
	m.SSH = &provision.SSH{Host: "127.0.0.1", Port: port, User: e.Settings.SSHUser, HostKey: guest.AuthorizedKey(hostKey, name)}
	if err := conn.SetMetadata(name, m); err != nil {
		return err
	}
	s, err := e.sshTransport(m.SSH, key)
	if err != nil {
		return err
	}
	s.Rekey = agent.ReloadSSHD
	return s.WaitReady(ctx)
}

// clientKey derives the instance's SSH client key; only prepare may create the secret.
func (e *Executor) clientKey(inst provision.Instance, create bool) (ssh.Signer, error) {
	secret, err := guest.LoadSecret(e.Settings.SecretFile, create)
	if err != nil {
		return nil, err
	}
	return guest.ClientKey(secret, inst.UUID)
}

func (e *Executor) sshTransport(info *provision.SSH, key ssh.Signer) (*guest.SSH, error) {
	hostKey, _, _, _, err := ssh.ParseAuthorizedKey([]byte(info.HostKey))
	if err != nil {
		return nil, fmt.Errorf("pinned host key in the metadata: %w", err)
	}
	return &guest.SSH{
		Addr:    net.JoinHostPort(info.Host, strconv.Itoa(info.Port)),
		User:    info.User,
		Key:     key,
		HostKey: hostKey,
	}, nil
}

// spec lays out the instance: one overlay per writable template disk, the metadata that
// records them, and the domain XML.
func (e *Executor) spec(t Target, tmpl *template.Template, prepareID string, size Size) (provision.Spec, error) {
	meta := provision.Metadata{
		Template:  tmpl.Name,
		Owner:     t.Owner,
		PrepareID: prepareID,
		CreatedAt: time.Now().UTC().Format(time.RFC3339),
	}
	if !t.ByHand {
		meta.Runner = runnerRef()
	}
	spec := provision.Spec{Name: t.Name}
	overlays := map[string]template.Overlay{}
	for _, d := range tmpl.Disks {
		// The prepare's id in the volume's name: no other prepare's volume can be in the way.
		v := provision.NewVolume{
			Volume:        provision.Volume{Pool: e.Settings.Pool, Name: t.Name + "-" + prepareID[:6] + "-" + d.Target + ".qcow2"},
			BackingPath:   d.Path,
			BackingFormat: d.Format,
		}
		if len(spec.Volumes) == 0 {
			v.Capacity = size.Disk // the first disk: the one a job may grow
		}
		spec.Volumes = append(spec.Volumes, v)
		meta.Volumes = append(meta.Volumes, v.Volume)
		overlays[d.Target] = template.Overlay{Pool: v.Pool, Volume: v.Name}
	}
	md, err := meta.MarshalElement()
	if err != nil {
		return spec, err
	}
	inst := template.Instance{Name: t.Name, Overlays: overlays, Metadata: md, CPUs: size.CPUs, MemoryKiB: size.Memory / 1024}
	if e.Settings.Transport == TransportSSH {
		slot, err := tmpl.FreePCISlot()
		if err != nil {
			return spec, err
		}
		inst.QEMUArgs = sshNetArgs(slot)
	}
	spec.DomainXML, err = tmpl.Render(inst)
	return spec, err
}

// sshNetArgs give an ssh instance a NIC on QEMU's user-mode network that reaches nothing
// but the host (restrict=on), and forward a free port on the host's 127.0.0.1 (port 0: the
// kernel picks one, so concurrent prepares cannot collide) to the guest's sshd. The NIC
// goes in a PCI slot the template leaves free: libvirt does not place devices it did not
// make.
func sshNetArgs(slot int) []string {
	return []string{
		"-netdev", "user,id=gcissh,restrict=on,hostfwd=tcp:127.0.0.1:0-:22",
		"-device", fmt.Sprintf("virtio-net-pci,netdev=gcissh,addr=0x%x", slot),
	}
}

// rollback removes a half-made instance: only the one this prepare (prepareID) made. It
// runs on a connection of its own (the prepare connection closes with the cancel), with
// ctx ending AfterCancel after the cancel.
func (e *Executor) rollback(ctx context.Context, name, prepareID string) {
	err := e.teardown(ctx, name, func(m provision.Metadata) error {
		if m.PrepareID != prepareID {
			return fmt.Errorf("instance %q was made by another prepare (%s), not this one (%s); leaving it alone", name, m.PrepareID, prepareID)
		}
		return nil
	})
	if err != nil {
		e.Log.Error(fmt.Sprintf("could not remove %s after the failed prepare: %v", name, err))
	}
}

func (e *Executor) teardown(ctx context.Context, name string, allow func(provision.Metadata) error) error {
	ctx, cancel := context.WithTimeoutCause(ctx, teardownTime, fmt.Errorf("teardown took longer than %s", teardownTime))
	defer cancel()
	start := time.Now()
	// libvirtd may be restarting (that may be why a prepare failed): try for a while.
	conn, err := e.connect(ctx)
	for err != nil && time.Since(start) < reconnectTime && sleepCtx(ctx, 250*time.Millisecond) {
		conn, err = e.connect(ctx)
	}
	if err != nil {
		return err
	}
	defer conn.Close()
	r, err := conn.Teardown(name, allow)
	if err != nil {
		return err
	}
	if r.Domain {
		e.Log.Info(fmt.Sprintf("removed %s and %d volumes in %d ms", name, len(r.Volumes), time.Since(start).Milliseconds()))
	} else {
		e.Log.Info(fmt.Sprintf("no instance %s; nothing to remove", name))
	}
	return nil
}

// Run runs one stage script in the instance with its output streamed live. A script that
// exits non-zero is a BuildFailure, its code written to the runner's BUILD_EXIT_CODE_FILE.
func (e *Executor) Run(ctx context.Context, t Target, scriptPath, stage, exitCodeFile string) error {
	script, err := os.ReadFile(scriptPath)
	if err != nil {
		return fmt.Errorf("read %s script: %w", stage, err)
	}
	// The connection must outlive a cancel: killing the script in the guest needs it. But
	// not for long: a stalled libvirtd must not keep a cancelled stage alive.
	cctx, cancel := lingering(ctx, AfterCancel)
	defer cancel()
	conn, err := e.connect(cctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	inst, err := conn.Lookup(t.Name)
	if errors.Is(err, provision.ErrNoInstance) {
		return fmt.Errorf("%s: %w (was prepare run?)", stage, err)
	}
	if err != nil {
		return fmt.Errorf("%s: %w", stage, err)
	}
	if err := t.mine(inst.Metadata); err != nil {
		return fmt.Errorf("%s: %w", stage, err)
	}
	// The transport is the one prepare set up, as the metadata says.
	var tr guest.Transport
	if info := inst.Metadata.SSH; info != nil {
		key, err := e.clientKey(inst, false)
		if err != nil {
			return err
		}
		if tr, err = e.sshTransport(info, key); err != nil {
			return err
		}
	} else if tr, err = guest.NewAgent(conn.API(), t.Name); err != nil {
		return err
	}
	start := time.Now()
	st, err := tr.Run(ctx, script, e.Stdout, e.Stderr)
	if err != nil && inst.Metadata.SSH == nil && conn.IsLost() {
		err = fmt.Errorf("%w: %v", provision.ErrLost, err) // the agent's calls failed for that
	}
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
	if e.Settings.KeepFailed > 0 && stage != "after_script" && inst.Metadata.FailedAt == "" {
		// For cleanup, which keeps the VM of a failed job: it has no other way to know.
		m := inst.Metadata
		m.FailedAt = time.Now().UTC().Format(time.RFC3339)
		if err := conn.SetMetadata(t.Name, m); err != nil {
			e.Log.Warn(fmt.Sprintf("could not mark %s as failed; cleanup will remove it: %v", t.Name, err))
		}
	}
	return &BuildFailure{Code: st.Code}
}

// Cleanup removes the instance and its volumes. It finishes even after a cancel, and is
// idempotent: a missing or half-made instance is fine.
func (e *Executor) Cleanup(ctx context.Context, t Target) error {
	after, cancel := lingering(ctx, AfterCancel)
	defer cancel()
	if kept, err := e.keepFailed(after, t); kept || err != nil {
		return err
	}
	err := e.teardown(after, t.Name, t.mine)
	if errors.Is(err, provision.ErrNotManaged) {
		return fmt.Errorf("domain %q was not created by libvirt-gci; refusing to remove it", t.Name)
	}
	return err
}

// keepFailed keeps the instance of a failed job for LIBVIRT_GCI_KEEP_FAILED, by hand
// excepted (cleanup --machine removes it). It says whether it did.
func (e *Executor) keepFailed(ctx context.Context, t Target) (bool, error) {
	if e.Settings.KeepFailed == 0 || t.ByHand {
		return false, nil
	}
	conn, err := e.connect(ctx)
	if err != nil {
		return false, err
	}
	defer conn.Close()
	inst, err := conn.Lookup(t.Name)
	if err != nil || t.mine(inst.Metadata) != nil || inst.Metadata.FailedAt == "" {
		return false, nil // the teardown says what is wrong, if anything
	}
	until := time.Now().Add(e.Settings.KeepFailed).UTC()
	m := inst.Metadata
	m.KeepUntil = until.Format(time.RFC3339)
	if err := conn.SetMetadata(t.Name, m); err != nil {
		return false, err
	}
	e.Log.Info(fmt.Sprintf("kept %s after the failed job, until %s (LIBVIRT_GCI_KEEP_FAILED): reach it with `libvirt-gci run --machine %s SCRIPT` "+
		"or `virsh console %s`; `libvirt-gci cleanup --machine %s` removes it, gc does after that time",
		t.Name, until.Format(time.RFC3339), t.Name, t.Name, t.Name), "name", t.Name, "keep_until", m.KeepUntil)
	return true, nil
}

// randomHex is n random bytes in hex.
func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
