package provision

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/libvirt-gci/libvirt-gci/provision/libvirt"
	"github.com/libvirt-gci/libvirt-gci/provision/provisiontest"
)

// The probe tells a QEMU that ran its guest's code from one that did not, within its
// bound: under software emulation the sector runs; without /dev/kvm KVM fails at once;
// a QEMU that never runs the guest (as on a host whose KVM spins) is ended at the
// bound, and said so.
func TestProbeAccel(t *testing.T) {
	t.Parallel()
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Skip("no qemu-system-x86_64 here")
	}
	ctx := context.Background()
	require.NoError(t, ProbeAccel(ctx, qemu, "tcg", AccelProbeTime), "the sector runs under software emulation")
	if _, err := os.Stat("/dev/kvm"); os.IsNotExist(err) {
		err := ProbeAccel(ctx, qemu, "kvm", AccelProbeTime)
		require.Error(t, err)
		assert.Contains(t, err.Error(), "QEMU under kvm")
	}

	stalled := filepath.Join(t.TempDir(), "qemu")
	require.NoError(t, os.WriteFile(stalled, []byte("#!/bin/sh\nexec sleep 600\n"), 0o755))
	start := time.Now()
	err = ProbeAccel(ctx, stalled, "kvm", time.Second)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "no guest code ran under kvm within 1s")
	assert.Less(t, time.Since(start), 5*time.Second, "ended at its bound")

	ok := filepath.Join(t.TempDir(), "qemu")
	require.NoError(t, os.WriteFile(ok, []byte("#!/bin/sh\nexit 0\n"), 0o755))
	assert.ErrorContains(t, ProbeAccel(ctx, ok, "kvm", time.Second), "ended without running the guest code")
}

// Doctor says KVM works only once a guest ran under it (issue 36): where libvirt offers
// it and the probe's QEMU runs no guest code, it is a problem with the fix; base images
// (LIBVIRT_GCI_BASE_VIRT=auto) then run under software emulation.
func TestDoctorKVMNeedsAGuestThatRan(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	broken, works := filepath.Join(dir, "broken"), filepath.Join(dir, "works")
	require.NoError(t, os.WriteFile(broken, []byte("#!/bin/sh\necho 'KVM: entry failed' >&2\nexit 1\n"), 0o755))
	require.NoError(t, os.WriteFile(works, []byte("#!/bin/sh\nexit 99\n"), 0o755)) // isa-debug-exit's code for the sector's write
	f := provisiontest.New("ci")
	var log bytes.Buffer
	h := readyHost(t, f, &log, time.Minute)
	h.URI = "qemu:///system"
	conn := libvirt.NewConn(f)
	ctx := context.Background()

	got, _ := h.doctorKVM(ctx, conn)
	assert.Equal(t, FindingNote, got[0].Status, "no KVM offered: %v", got)
	assert.Equal(t, "qemu", h.virtType(ctx, conn))

	f.SetKVM(works)
	got, _ = h.doctorKVM(ctx, conn)
	assert.Equal(t, Finding{Check: "KVM", Status: FindingOK, Detail: "libvirt offers it, and a guest ran under it"}, got[0])
	assert.Equal(t, "kvm", h.virtType(ctx, conn))

	f.SetKVM(broken)
	got, _ = h.doctorKVM(ctx, conn)
	assert.Equal(t, FindingProblem, got[0].Status)
	assert.Contains(t, got[0].Detail, "libvirt offers it, but QEMU under kvm: exit status 1: KVM: entry failed")
	assert.Contains(t, got[0].Fix, "LIBVIRT_GCI_BASE_VIRT=qemu")
	assert.Equal(t, "qemu", h.virtType(ctx, conn))
	assert.Contains(t, log.String(), "base images run under software emulation: libvirt offers KVM, but")

	h.URI = "qemu+ssh://elsewhere/system"
	got, _ = h.doctorKVM(ctx, conn)
	assert.Equal(t, Finding{Check: "KVM", Status: FindingOK, Detail: "libvirt offers it (a remote host: not probed from here)"}, got[0])
}

// Where no guest runs under KVM, doctor names each template of type kvm (its clones
// would wait out their boot timeout).
func TestDoctorFlagsKVMTemplatesWhereKVMIsBroken(t *testing.T) {
	t.Parallel()
	broken := filepath.Join(t.TempDir(), "broken")
	require.NoError(t, os.WriteFile(broken, []byte("#!/bin/sh\nexit 1\n"), 0o755))
	f := provisiontest.New("ci")
	var log bytes.Buffer
	h := readyHost(t, f, &log, time.Minute)
	h.URI = "qemu:///system"
	_, err := f.DomainDefineXMLFlags(strings.Replace(strings.Replace(nicTemplate, "<name>tmpl</name>", "<name>tmplkvm</name>", 1), "<domain type='qemu'>", "<domain type='kvm'>", 1), 0)
	require.NoError(t, err)
	req := DoctorRequest{Offered: func(string, bool) bool { return true }, Transport: "agent"}
	flagged := func() []string {
		var out []string
		for _, f := range h.Doctor(context.Background(), req) {
			if f.Status == FindingProblem && strings.Contains(f.Detail, "no guest runs under KVM here") {
				out = append(out, f.Check)
			}
		}
		return out
	}
	assert.Empty(t, flagged(), "no KVM offered: nothing to say of it")
	f.SetKVM(broken)
	assert.Equal(t, []string{"template tmplkvm"}, flagged())
}

// A base image's prepare (LIBVIRT_GCI_BASE_VIRT=auto) probes KVM once per boot of the
// host and emulator: later prepares take the verdict left beside the secret, a changed
// emulator is probed again, and doctor always probes.
func TestKVMVerdictIsProbedOncePerEmulator(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	emu, runs := filepath.Join(dir, "qemu"), filepath.Join(dir, "runs")
	require.NoError(t, os.WriteFile(emu, []byte("#!/bin/sh\necho run >>"+runs+"\nexit 99\n"), 0o755))
	probes := func() int {
		b, _ := os.ReadFile(runs)
		return strings.Count(string(b), "run")
	}
	f := provisiontest.New("ci")
	var log bytes.Buffer
	h := readyHost(t, f, &log, time.Minute)
	h.URI = "qemu:///system"
	conn := libvirt.NewConn(f)
	ctx := context.Background()
	f.SetKVM(emu)
	for range 3 {
		assert.Equal(t, "kvm", h.virtType(ctx, conn))
	}
	assert.Equal(t, 1, probes())

	require.NoError(t, os.WriteFile(emu, []byte("#!/bin/sh\necho run >>"+runs+"\nexit 1\n"), 0o755)) // an upgrade that broke it
	assert.Equal(t, "qemu", h.virtType(ctx, conn))
	assert.Equal(t, "qemu", h.virtType(ctx, conn))
	assert.Equal(t, 2, probes())

	h.doctorKVM(ctx, conn)
	assert.Equal(t, 3, probes(), "doctor probes")
}
