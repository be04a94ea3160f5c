# What prepare does in a fresh clone through the agent, before any job code runs, in one
# command (each command through the agent costs a round trip, and each program it starts
# a fork and exec, which under software emulation take tens of milliseconds). Run by
# /bin/sh as `sh -c SETUP gci MAC ADDR SERIAL DIR NAME USER KEY TAG MOUNT HOSTS NOW
# HOSTNAME MACHINEID SEED MACS HOSTKEYS`; each part runs only where its arguments are given:
#   - a restored clone first becomes itself (Identity): the clock set to NOW (seconds
#     since the epoch), fresh host randomness (SEED) mixed into the kernel's pool and the
#     RNG reseeded from it (by the kernel itself where it has the VM generation ID driver,
#     as libvirt gives a restored VM a new one; else by the RNDRESEEDCRNG ioctl, through
#     perl or python3; where it can do neither it stops, exit 3, before anything
#     makes keys), its own machine-id (journald's files follow it,
#     so that journalctl shows this boot's log), and each NIC's MAC address changed from
#     the warm image's to its own (MACS: OLD=NEW ...);
#   - every clone gets the host name HOSTNAME (kernel, /etc/hostname, /etc/hosts);
#   - where systemd runs, the services that read what changed at their start (journald,
#     networkd: its DHCP client id comes from the machine-id) start again;
#   - it brings up the NIC with the MAC address MAC with the address ADDR, whatever the
#     guest's own network configuration did with it (most configure only their first);
#   - it mounts the read-only disk whose serial is SERIAL on DIR and links DIR/NAME into
#     /usr/local/bin;
#   - it mounts the virtiofs share TAG on MOUNT (waiting for a share attached just now);
#   - it makes each of the host names HOSTS (space-separated) resolve to 127.0.0.1;
#   - it authorizes the instance's client key KEY for USER;
#   - with USER, or where the guest has sshd, it replaces the host keys cloned from the
#     template (or the warm image) by the Ed25519 key the host made for this instance
#     (HOSTKEYS its public line, the private key on standard input: a key made in the
#     guest took 0.2 s, its program started cold, and came from the clone's RNG), has sshd load it
#     (or start, where systemd has it enabled but it could not start without keys), and
#     says "gci-hostkey: installed".
set -e
mac=$1 addr=$2 serial=$3 dir=$4 name=$5 user=$6 key=$7 tag=$8 mnt=$9 hosts=${10}
now=${11} hn=${12} mid=${13} seed=${14} macs=${15} hostkeys=${16}
ipcmd=ip
command -v ip >/dev/null 2>&1 || ipcmd="busybox ip"
systemd=
if [ -d /run/systemd/system ]; then systemd=1; fi
restart=
# The identity helper: where the warm image's guest has perl, quiesce left a perl
# waiting on the FIFO $h.in (its pid in $h.pid) to do what a clone's identity would
# otherwise start programs for, each started cold (on the systemd guest perl took 0.35 s
# for the RNG's reseed, mv and ip 0.1 s each): the requests, one a line, go to $h.in
# ("reseed", "rename FROM TO", "mac DEV ADDRESS"), and its answers come from $h.out,
# the last "done". It ends then: it is asked once, also with nothing to do.
h=/run/libvirt-gci/identity helper= req=
if [ -n "$now" ] && [ -p "$h.in" ] && [ -p "$h.out" ]; then
  hp= hc=
  read -r hp <"$h.pid" 2>/dev/null || true
  if [ -n "$hp" ]; then read -r hc <"/proc/$hp/comm" 2>/dev/null || true; fi
  if [ "$hc" = perl ]; then helper=1; fi
fi
reseed() {
  if perl -e 'open(my $f, ">", "/dev/urandom") or exit 1; ioctl($f, 0x5207, 0) or exit 1' 2>/dev/null ||
    python3 -c 'import fcntl; fcntl.ioctl(open("/dev/urandom", "wb"), 0x5207)' 2>/dev/null; then
    echo "gci-rng: reseeded"
  else
    # No reseed, no clone: its keys would come from randomness other clones share.
    echo "gci-rng: cannot reseed" >&2
    exit 3
  fi
}
if [ -n "$now" ]; then
  { date -u -s "@$now" >/dev/null 2>&1 || busybox date -u -s "@${now%.*}" >/dev/null; } &
  clock=$!
  printf '%s' "$seed" >/dev/urandom
  if [ -d /sys/bus/acpi/drivers/vmgenid ]; then
    echo "gci-rng: reseeded"
  elif [ -n "$helper" ]; then
    req="reseed
"
  else
    reseed
  fi
fi
if [ -n "$hn" ]; then
  printf '%s' "$hn" >/proc/sys/kernel/hostname
  printf '%s\n' "$hn" >/etc/hostname
  if [ -f /etc/hosts ]; then
    hs=
    while IFS= read -r l || [ -n "$l" ]; do
      case $l in 127.0.1.1[[:space:]]*) l="127.0.1.1 $hn" ;; esac
      hs="$hs$l
"
    done </etc/hosts
    printf '%s' "$hs" >/etc/hosts
  fi
  # hostnamed (systemd 252 at least) reads /etc/hostname again for each question: not
  # restarted (that took 0.3-0.6 s on the systemd guest).
fi
if [ -n "$mid" ]; then
  old=
  read -r old </etc/machine-id 2>/dev/null || true
  printf '%s\n' "$mid" >/etc/machine-id
  if [ -f /var/lib/dbus/machine-id ] && [ ! -L /var/lib/dbus/machine-id ]; then printf '%s\n' "$mid" >/var/lib/dbus/machine-id; fi
  # journald writes, and journalctl reads, the directory named by the machine-id: the
  # boot's log so far moves with it, and journald, started again, writes there.
  if [ -n "$old" ] && [ "$old" != "$mid" ]; then
    for j in /var/log/journal /run/log/journal; do
      if [ -d "$j/$old" ] && [ ! -e "$j/$mid" ]; then
        if [ -n "$helper" ]; then req="${req}rename $j/$old $j/$mid
"; else mv "$j/$old" "$j/$mid"; fi
      fi
    done
  fi
  restart="$restart systemd-journald.service systemd-networkd.service"
fi
if [ -n "$now" ]; then wait "$clock"; fi
for m in $macs; do
  old=${m%%=*} new=${m#*=} dev=
  for d in /sys/class/net/*; do
    a=; read -r a <"$d/address" 2>/dev/null || true
    if [ "$a" = "$old" ]; then dev=${d##*/}; fi
  done
  [ -n "$dev" ] || { echo "no network interface with the MAC address $old in the guest" >&2; exit 4; }
  if [ -n "$helper" ]; then req="${req}mac $dev $new
"; else $ipcmd link set dev "$dev" address "$new"; fi
done
if [ -n "$helper" ]; then
  exec 8<>"$h.in"
  printf '%s' "$req" >&8
  exec 8>&-
  ok=
  while IFS= read -r l; do
    case $l in
      "gci-rng: reseeded") echo "$l" ;;
      "gci-rng: cannot reseed"*) reseed ;;
      done) ok=1 ;;
      *) echo "$l" >&2; exit 4 ;;
    esac
  done <"$h.out"
  [ -n "$ok" ] || { echo "the identity helper ended before it was done" >&2; exit 4; }
fi
if [ -n "$systemd" ] && [ -n "$restart" ]; then
  # Only those that run, and before the ssh NIC gets its address below: networkd, started
  # again, drops the addresses it did not make on the links it manages. Waited for: on
  # the guest's one CPU their start costs as much later (the job's address waits for
  # networkd: started in the background, 0.8 s came off the set-up and 0.8 s onto that
  # wait). Not under timeout (a program more: 0.1 s): systemd bounds its jobs (a unit's
  # TimeoutStopSec and TimeoutStartSec), and the host the whole set-up.
  # shellcheck disable=SC2086 # a list of units
  systemctl try-restart $restart 2>/dev/null || true
fi
for h in $hosts; do printf '127.0.0.1 %s\n' "$h" >>/etc/hosts; done
if [ -n "$tag" ]; then
  [ -d "$mnt" ] || mkdir -p "$mnt"
  # A restored clone's share was attached after its restore: the guest's kernel finds
  # the device a moment later. Tried for up to 10 s.
  i=0
  until mount -t virtiofs "$tag" "$mnt" 2>/dev/null; do
    i=$((i + 1))
    [ "$i" -lt 100 ] || { echo "no virtiofs share $tag in the guest" >&2; exit 4; }
    sleep 0.1
  done
fi
if [ -n "$mac" ]; then
  dev=
  for d in /sys/class/net/*; do
    a=; read -r a <"$d/address" 2>/dev/null || true
    if [ "$a" = "$mac" ]; then dev=${d##*/}; fi
  done
  [ -n "$dev" ] || { echo "no network interface with the MAC address $mac in the guest" >&2; exit 4; }
  $ipcmd link set dev "$dev" up
  $ipcmd addr replace "$addr" dev "$dev"
fi
if [ -n "$serial" ]; then
  dev=
  for b in /sys/block/*; do
    sn=; read -r sn <"$b/serial" 2>/dev/null || true
    if [ "$sn" = "$serial" ]; then dev=/dev/${b##*/}; fi
  done
  [ -n "$dev" ] || { echo "no disk with the serial $serial in the guest" >&2; exit 4; }
  mount -t ext4 -o ro,X-mount.mkdir "$dev" "$dir" 2>/dev/null || { mkdir -p "$dir" && mount -t ext4 -o ro "$dev" "$dir"; }
  # The link, for whatever runs outside the stages, after this command has ended: each
  # program started costs a tenth of a second under emulation. The stages have $dir
  # on their PATH meanwhile (runWrapper; over ssh, sshd is not ready before it is done).
  { [ -d /usr/local/bin ] || mkdir -p /usr/local/bin; ln -sf "$dir/$name" "/usr/local/bin/$name"; } </dev/null >/dev/null 2>&1 &
fi
if [ -n "$user" ]; then
  home=$(getent passwd "$user" | cut -d: -f6)
  [ -n "$home" ] || { echo "no user $user in the guest" >&2; exit 3; }
  umask 077
  mkdir -p "$home/.ssh"
  printf '%s\n' "$key" >>"$home/.ssh/authorized_keys"
  chown "$user:$(id -gn "$user")" "$home/.ssh" "$home/.ssh/authorized_keys"
  chmod 700 "$home/.ssh"
  chmod 600 "$home/.ssh/authorized_keys"
fi
if [ -n "$hostkeys" ] && { [ -n "$user" ] || { [ -d /etc/ssh ] && { command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ]; }; }; }; then
  umask 077
  # The template's keys of other types go (rm only where there are any: each program
  # costs tens of milliseconds); the Ed25519 key is written over.
  for k in /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub; do
    case $k in /etc/ssh/ssh_host_ed25519_key | /etc/ssh/ssh_host_ed25519_key.pub) ;; *) [ ! -e "$k" ] || rm -f "$k" ;; esac
  done
  priv=
  while IFS= read -r l; do priv="$priv$l
"; done
  case $priv in "-----BEGIN OPENSSH PRIVATE KEY-----"*) ;; *) echo "no host key on standard input" >&2; exit 3 ;; esac
  printf '%s' "$priv" >/etc/ssh/ssh_host_ed25519_key
  umask 022
  printf '%s\n' "$hostkeys" >/etc/ssh/ssh_host_ed25519_key.pub
  if [ -s /run/sshd.pid ]; then
    pid=
    read -r pid </run/sshd.pid || true
    [ -z "$pid" ] || kill -HUP "$pid" 2>/dev/null || true
  elif [ -n "$systemd" ]; then
    # An sshd that could not start at boot for want of host keys (a template whose keys
    # were removed, as template make does) starts now, where it is enabled.
    for u in ssh.service sshd.service; do
      if systemctl -q is-enabled "$u" 2>/dev/null; then
        systemctl reset-failed "$u" 2>/dev/null || true
        systemctl --no-block restart "$u" 2>/dev/null || true
        break
      fi
    done
  fi
  echo "gci-hostkey: installed"
fi
