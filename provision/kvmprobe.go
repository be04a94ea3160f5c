package provision

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/libvirt-gci/libvirt-gci/provision/libvirt"
	"github.com/libvirt-gci/libvirt-gci/provision/libvirt/dial"
)

// A machine whose /dev/kvm opens, and creates VMs and vCPUs, may still never run a
// guest under KVM (nested virtualization without the CPU's extension: QEMU spins in
// the kernel, and a guest waits out its boot timeout). Only a guest that ran tells: the
// probe boots a boot sector that writes to QEMU's isa-debug-exit port, which ends QEMU
// with an exit code nothing but guest code gives.

// probeSector is a PC boot sector: mov al, 0x31; out 0xf4, al; then hlt for good.
var probeSector = func() []byte {
	b := make([]byte, 512)
	copy(b, []byte{0xB0, 0x31, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD})
	b[510], b[511] = 0x55, 0xAA
	return b
}()

// probeExit is QEMU's exit code once the sector ran: isa-debug-exit exits with
// (value << 1) | 1.
const probeExit = 0x31<<1 | 1

// AccelProbeTime bounds an accelerator probe: SeaBIOS and the sector take a fraction of a second under
// KVM, 0.3 s under software emulation here.
const AccelProbeTime = 10 * time.Second

// ProbeAccel boots the probe sector with QEMU's emulator under accel ("kvm", "tcg")
// and says why no guest code ran within bound; nil if it ran.
func ProbeAccel(ctx context.Context, emulator, accel string, bound time.Duration) error {
	dir, err := os.MkdirTemp("", "libvirt-gci-probe")
	if err != nil {
		return fmt.Errorf("probe %s: %w", accel, err)
	}
	defer os.RemoveAll(dir)
	img := filepath.Join(dir, "sector.img")
	if err := os.WriteFile(img, probeSector, 0o600); err != nil {
		return fmt.Errorf("probe %s: %w", accel, err)
	}
	ctx, cancel := context.WithTimeout(ctx, bound)
	defer cancel()
	cmd := exec.CommandContext(ctx, emulator, "-accel", accel, "-machine", "pc", "-m", "16", "-nodefaults", "-no-user-config",
		"-display", "none", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x01", "-drive", "file="+img+",format=raw,if=ide")
	cmd.WaitDelay = time.Second
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err = cmd.Run()
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee) && ee.ExitCode() == probeExit:
		return nil
	case ctx.Err() != nil:
		return fmt.Errorf("no guest code ran under %s within %s (QEMU started, and its guest never reached its first instructions)", accel, bound)
	case err == nil:
		return fmt.Errorf("QEMU under %s ended without running the guest code", accel)
	default:
		return fmt.Errorf("QEMU under %s: %v: %s", accel, err, strings.TrimSpace(out.String()))
	}
}

// kvm says whether libvirt offers KVM (offered) and, on a local libvirt, why a guest
// does not run under it (the probe; nil where it ran, or where the libvirt is remote
// and cannot be probed from here).
// With cached, a verdict this boot of the host left for the same emulator stands
// (kvmVerdict).
func (h *Host) kvm(ctx context.Context, conn *libvirt.Conn, cached bool) (offered bool, probed bool, err error) {
	emulator, err := conn.KVMEmulator()
	if err != nil {
		return false, false, err
	}
	if emulator == "" || !dial.IsLocal(h.URI) {
		return emulator != "", false, nil
	}
	return true, true, h.kvmVerdict(ctx, emulator, cached)
}

// kvmVerdict probes KVM with emulator and leaves the verdict in the file kvm-probe
// beside the secret file, with what it holds for: this boot of the host and this very
// emulator (its path, size and time). With cached, such a verdict stands without a
// probe: a base image's prepare pays for it once per boot, not every time (0.3 s, and
// the whole AccelProbeTime where KVM runs no guest). A probe cut short by ctx is not
// left.
func (h *Host) kvmVerdict(ctx context.Context, emulator string, cached bool) error {
	key := readTrimmed(bootIDFile) + " " + emulator
	if fi, err := os.Stat(emulator); err == nil {
		key += fmt.Sprintf(" %d %d", fi.Size(), fi.ModTime().UnixNano())
	}
	file := filepath.Join(filepath.Dir(h.SecretFile), "kvm-probe")
	if cached {
		if b, err := os.ReadFile(file); err == nil {
			if held, verdict, ok := strings.Cut(string(b), "\n"); ok && held == key {
				if verdict == "ok" {
					return nil
				}
				return errors.New(verdict)
			}
		}
	}
	err := ProbeAccel(ctx, emulator, "kvm", AccelProbeTime)
	if ctx.Err() != nil {
		return err
	}
	verdict := "ok"
	if err != nil {
		verdict = strings.ReplaceAll(err.Error(), "\n", " ")
	}
	if os.MkdirAll(filepath.Dir(file), 0o700) == nil {
		tmp := file + ".tmp" + randomHex(4)
		if os.WriteFile(tmp, []byte(key+"\n"+verdict), 0o600) == nil {
			_ = os.Rename(tmp, file)
		}
		os.Remove(tmp)
	}
	return err
}

// doctorKVM says whether libvirt offers KVM and, on a local host, whether a guest runs
// under it (a machine whose /dev/kvm opens may still never run one), and whether
// /dev/kvm has the mode that keeps libvirtd from probing QEMU again on every call.
// It says too whether KVM is broken: offered, and no guest ran under it.
func (h *Host) doctorKVM(ctx context.Context, conn *libvirt.Conn) ([]Finding, bool) {
	f, offered, err := h.doctorKVMFindings(ctx, conn)
	return f, offered && err != nil
}

func (h *Host) doctorKVMFindings(ctx context.Context, conn *libvirt.Conn) ([]Finding, bool, error) {
	offered, probed, err := h.kvm(ctx, conn, false)
	if !offered && err != nil {
		return []Finding{{Check: "KVM", Status: FindingProblem, Detail: err.Error(), Fix: "check libvirtd's log"}}, false, err
	}
	var out []Finding
	if dial.IsLocal(h.URI) {
		if fi, err := os.Stat("/dev/kvm"); err == nil {
			if hint := libvirt.KVMModeHint(fi.Mode()); hint != "" {
				out = append(out, Finding{Check: "/dev/kvm's mode", Status: FindingProblem, Detail: fmt.Sprintf("mode %s", fi.Mode().Perm()), Fix: hint})
			} else {
				out = append(out, Finding{Check: "/dev/kvm's mode", Status: FindingOK, Detail: fmt.Sprintf("mode %s", fi.Mode().Perm())})
			}
		}
	}
	switch {
	case offered && err != nil:
		return append([]Finding{{Check: "KVM", Status: FindingProblem, Detail: "libvirt offers it, but " + err.Error(),
			Fix: "use domain type qemu (software emulation): LIBVIRT_GCI_BASE_VIRT=qemu, and <domain type='qemu'> in templates (those of type kvm will hang); or make KVM work (nested virtualization needs the CPU's extension in this VM)"}}, out...), true, err
	case offered && probed:
		return append([]Finding{{Check: "KVM", Status: FindingOK, Detail: "libvirt offers it, and a guest ran under it"}}, out...), true, nil
	case offered:
		return append([]Finding{{Check: "KVM", Status: FindingOK, Detail: "libvirt offers it (a remote host: not probed from here)"}}, out...), true, nil
	}
	return append([]Finding{{Check: "KVM", Status: FindingNote, Detail: "libvirt does not offer it: guests run under software emulation, many times slower",
		Fix: "on a machine with virtualization, enable it in the firmware and load kvm_intel or kvm_amd"}}, out...), false, nil
}
