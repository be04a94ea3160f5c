package guest

// The guest's set-up through the agent: a fresh clone becomes itself (Setup, setup.sh),
// a guest readied for a warm image's save (Quiesce, with the identity helper), and a
// template made by hand (ResetIdentity, PowerOff).

import (
	"context"
	"crypto/rand"
	_ "embed"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	"golang.org/x/crypto/ssh"
)

// guestSetup is what prepare does in a fresh clone through the agent, in one command
// (setup.sh says what, and its arguments).
//
//go:embed setup.sh
var guestSetup string

// sshdReload has a running sshd (re-exec and) load its host keys again.
const sshdReload = `if [ -s /run/sshd.pid ]; then kill -HUP "$(cat /run/sshd.pid)" 2>/dev/null || true; fi`

// NIC is a network interface to configure in the guest, found by its MAC address.
type NIC struct {
	MAC  string // lower case, as Linux shows it
	Addr string // CIDR, such as 10.213.213.15/24
}

// Helper is a program on a read-only disk, found in the guest by the disk's serial,
// mounted on Dir, and put on the PATH (/usr/local/bin).
type Helper struct {
	Serial, Dir, Name string
}

// SSHAccess is what the ssh transport needs in the guest: AuthorizedKey for User, and a
// host key of the instance's own.
type SSHAccess struct {
	User, AuthorizedKey string
}

// Setup is what prepare does in a fresh clone through the agent, before any job code
// runs; nil parts are left out.
type Setup struct {
	NIC    *NIC
	Helper *Helper
	Share  *Share
	SSH    *SSHAccess
	Hosts  []string // names to resolve to 127.0.0.1 (in /etc/hosts)
	// Hostname is the instance's, whatever its start: the kernel's, /etc/hostname's and
	// the 127.0.1.1 line of /etc/hosts.
	Hostname string
	// HostKeys: replace the SSH host keys cloned from the template (or the warm image) by
	// a key of the clone's own, where the guest has sshd, whatever the transport (SSH
	// does it always).
	HostKeys bool
	// Identity makes a clone restored from a warm image its own; nil for a cold boot.
	Identity *Identity
}

// Identity is what two clones restored from one memory image would otherwise share.
type Identity struct {
	MachineID string      // 32 hex digits
	MACs      [][2]string // each NIC's MAC address: the warm image's, and the clone's
}

// Share is a virtiofs share, mounted by its tag on Dir.
type Share struct {
	Tag, Dir string
}

// Setup sets the guest up, in one command. With SSH it returns the guest's new host
// key, made here (from the host's randomness) and installed through the agent: the key
// to pin.
func (a *Agent) Setup(ctx context.Context, s Setup) (ssh.PublicKey, error) {
	args := make([]string, 16)
	args[11] = s.Hostname
	var hostKey ssh.PublicKey
	var input []byte
	if s.HostKeys || s.SSH != nil {
		pub, priv, err := NewHostKey()
		if err != nil {
			return nil, fmt.Errorf("set up the guest: %w", err)
		}
		hostKey, input = pub, priv
		args[15] = AuthorizedKey(pub, "libvirt-gci")
	}
	if id := s.Identity; id != nil {
		var macs []string
		for _, m := range id.MACs {
			macs = append(macs, strings.ToLower(m[0])+"="+strings.ToLower(m[1]))
		}
		seed := make([]byte, 64)
		_, _ = rand.Read(seed)
		now := time.Now()
		args[10] = fmt.Sprintf("%d.%09d", now.Unix(), now.Nanosecond())
		args[12], args[13], args[14] = id.MachineID, hex.EncodeToString(seed), strings.Join(macs, " ")
	}
	if s.NIC != nil {
		args[0], args[1] = s.NIC.MAC, s.NIC.Addr
	}
	if s.Helper != nil {
		args[2], args[3], args[4] = s.Helper.Serial, s.Helper.Dir, s.Helper.Name
	}
	if s.SSH != nil {
		args[5], args[6] = s.SSH.User, s.SSH.AuthorizedKey
	}
	if s.Share != nil {
		args[7], args[8] = s.Share.Tag, s.Share.Dir
	}
	args[9] = strings.Join(s.Hosts, " ")
	st, out, err := a.execWaitInput(ctx, input, "/bin/sh", append([]string{"-c", guestSetup, "gci"}, args...)...)
	if err != nil {
		return nil, fmt.Errorf("set up the guest: %w", err)
	}
	if strings.Contains(out, "gci-rng: cannot reseed") {
		return nil, fmt.Errorf("set up the guest: %w", ErrCannotReseed)
	}
	if st.Code != 0 || st.Signal != 0 {
		return nil, fmt.Errorf("set up the guest: %s: %s", st, strings.TrimSpace(out))
	}
	if s.Identity != nil && !strings.Contains(out, "gci-rng: reseeded") {
		return nil, fmt.Errorf("set up the guest: %w", ErrCannotReseed)
	}
	if s.SSH == nil {
		return nil, nil
	}
	if !strings.Contains(out, "gci-hostkey: installed") {
		return nil, fmt.Errorf("set up the guest: its host key was not installed: %q", strings.TrimSpace(out))
	}
	return hostKey, nil
}

// ReloadSSHD has the guest's sshd load its host keys again.
func (a *Agent) ReloadSSHD(ctx context.Context) error {
	_, _, err := a.execWait(ctx, "/bin/sh", "-c", sshdReload)
	return err
}

// quiesce lets the guest finish its boot (systemd's, where it has it, and says how it
// ended: "gci-system: STATE", "none" without systemd), syncs its file
// systems, drops its page cache and zeroes most of its free memory (the kernel zeroes
// the pages dd's buffer faults in): QEMU saves a zero page in a few bytes, so a memory
// image holds what the guest uses, not what it once read.
//
// Where the guest has perl, it also starts the identity helper that a restored clone's
// set-up asks (setup.sh says what for): perl, waiting on a FIFO, its output away from
// the guest-exec's capture.
const quiesce = `if [ -d /sys/bus/acpi/drivers/vmgenid ] || command -v perl >/dev/null 2>&1 || command -v python3 >/dev/null 2>&1; then
  echo "gci-rng: can reseed"
else
  echo "gci-rng: cannot reseed"
fi
if command -v perl >/dev/null 2>&1 && command -v mkfifo >/dev/null 2>&1; then
  h=` + Dir + `/identity
  mkdir -p -m 0700 ` + Dir + `
  rm -f "$h.in" "$h.out" "$h.pid"
  if mkfifo -m 0600 "$h.in" "$h.out"; then
    perl -e '` + identityHelper + `' "$h.in" "$h.out" "$h.pid" </dev/null >/dev/null 2>&1 &
    echo "$!" >"$h.pid"
  fi
fi
sync
s=none
if [ -d /run/systemd/system ]; then s=$(timeout 120 systemctl is-system-running --wait 2>/dev/null) || true; fi
echo "gci-system: ${s:-unknown}"
echo 3 >/proc/sys/vm/drop_caches
f=$(sed -n 's/^MemFree: *\([0-9]*\) kB$/\1/p' /proc/meminfo)
if [ -n "$f" ]; then dd if=/dev/zero of=/dev/null bs=$((f * 9 / 10))K count=1 2>/dev/null || true; fi
sync`

// identityHelper is the perl program of the identity helper (no single quote in it):
// it reads its requests from the FIFO $ARGV[0] to its writer's end, opens the FIFO
// $ARGV[1] (once its reader has), removes both and its pid file $ARGV[2] (nothing of it
// is left for the job to find), does each request, and says on $ARGV[1] what failed,
// and then "done". Requests: "reseed" (the RNDRESEEDCRNG
// ioctl on /dev/urandom), "rename FROM TO", "mac DEV ADDRESS" (SIOCSIFHWADDR: an
// Ethernet address, as ip link set address sets it).
const identityHelper = `open(my $q, "<", $ARGV[0]) or exit 1;
my @r = <$q>;
close($q);
open(my $o, ">", $ARGV[1]) or exit 1;
unlink(@ARGV);
my ($u, $s);
for (@r) {
  chomp;
  my ($op, $x, $y) = split(/ /, $_, 3);
  if ($op eq "reseed") {
    if (open($u, ">", "/dev/urandom") && ioctl($u, 0x5207, 0)) { print $o "gci-rng: reseeded\n" } else { print $o "gci-rng: cannot reseed: $!\n" }
  } elsif ($op eq "rename") {
    rename($x, $y) or print $o "cannot rename $x to $y: $!\n";
  } elsif ($op eq "mac") {
    (socket($s, 2, 2, 0) && ioctl($s, 0x8924, pack("a16 S C6 x16", $x, 1, map { hex } split(/:/, $y)))) or print $o "cannot set the MAC address of $x to $y: $!\n";
  } else {
    print $o "unknown request $op\n";
  }
}
print $o "done\n";`

// ErrCannotReseed: the guest has no way to reseed its kernel's RNG at once (no vmgenid
// driver, perl or python3 for the RNDRESEEDCRNG ioctl). Clones restored from its memory
// image would make keys from the randomness they share until the kernel reseeds on its
// own schedule, so such a guest is not restored.
var ErrCannotReseed = errors.New("the guest cannot reseed its RNG at once (no vmgenid driver, perl or python3): clones restored from its memory would share its randomness")

// Quiesce readies a guest for a memory image (a warm image's save). It refuses a guest
// whose clones could not reseed their RNG (ErrCannotReseed). It returns systemd's state
// once its boot ended ("running", "degraded", ...), "none" where systemd is not the
// guest's init.
func (a *Agent) Quiesce(ctx context.Context) (string, error) {
	st, out, err := a.execWait(ctx, "/bin/sh", "-c", quiesce)
	if err != nil {
		return "", fmt.Errorf("quiesce the guest: %w", err)
	}
	if st.Code != 0 || st.Signal != 0 {
		return "", fmt.Errorf("quiesce the guest: %s: %s", st, strings.TrimSpace(out))
	}
	if !strings.Contains(out, "gci-rng: can reseed") {
		return "", ErrCannotReseed
	}
	system := "unknown"
	for _, l := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(l, "gci-system: "); ok {
			system = strings.TrimSpace(v)
		}
	}
	return system, nil
}

// resetIdentity removes what makes a guest one machine rather than a template of many,
// as virt-sysprep does: its machine-id (emptied: systemd makes a new one at the next
// boot), D-Bus's copy of it, its SSH host keys, its logs, and the leases of its DHCP
// clients. Each part is skipped where the guest lacks it.
const resetIdentity = `[ -e /etc/machine-id ] && : >/etc/machine-id
[ -f /var/lib/dbus/machine-id ] && [ ! -L /var/lib/dbus/machine-id ] && rm -f /var/lib/dbus/machine-id
rm -f /etc/ssh/ssh_host_*key /etc/ssh/ssh_host_*key.pub
find /var/log -type f -delete 2>/dev/null
rm -rf /var/log/journal/* 2>/dev/null
rm -f /var/lib/dhcp/*.leases /var/lib/dhcp/*.lease /var/lib/dhclient/* /var/lib/dhcpcd/*.lease \
  /var/lib/NetworkManager/*.lease /var/lib/systemd/network/* /var/lib/udhcpc/* 2>/dev/null
sync
true`

// ResetIdentity runs resetIdentity in the guest.
func (a *Agent) ResetIdentity(ctx context.Context) error {
	st, out, err := a.execWait(ctx, "/bin/sh", "-c", resetIdentity)
	if err != nil {
		return fmt.Errorf("reset the guest's identity: %w", err)
	}
	if st.Code != 0 || st.Signal != 0 {
		return fmt.Errorf("reset the guest's identity: %s: %s", st, strings.TrimSpace(out))
	}
	return nil
}

// PowerOff asks the guest to power off by itself (poweroff, busybox's, or halt -p), for
// guests whose agent cannot shut them down (no /sbin/shutdown). It does not wait: the
// agent goes down with the guest.
func (a *Agent) PowerOff(ctx context.Context) error {
	_, err := a.exec(ctx, false, nil, "/bin/sh", "-c", "poweroff 2>/dev/null || busybox poweroff 2>/dev/null || halt -p")
	return err
}
