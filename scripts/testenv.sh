#!/usr/bin/env bash
# Sets up this machine for libvirt-gci's demo and tests, from a fresh Debian 12 on:
#   - installs libvirt, QEMU and the image-build tools from apt (if missing);
#   - starts virtlogd and libvirtd (if not running; CI has no systemd to do it);
#   - builds the tiny test guest once, cached by the hash of its builder in
#     make_base_image/, and the systemd Debian guest (make_base_image/debian/) the same way;
#   - creates the storage pools and defines the template domains: the tiny guest, and the
#     same with a NIC of its own on an isolated libvirt network (no forward, no address:
#     a bridge that reaches nothing), to test the ssh transport on templates with a NIC;
#     and the systemd guest, with a NIC on an isolated network of its own whose dnsmasq
#     hands out DHCP leases (no forward, no DNS: nothing leaves the machine);
#   - gives /dev/kvm the group and mode udev would, so libvirt's QEMU capability cache
#     stays valid (else libvirtd probes QEMU again on every call: defines take minutes);
#   - checks that a define takes well under a second, and stops with the reason if not.
# With "runner" (make test, make bench; not the demo), it also finds a gitlab-runner for
# the tests that drive libvirt-gci with the real runner: $GITLAB_RUNNER_BIN, else
# gitlab-runner on PATH, else one built once (about 5 minutes) from the Go module proxy
# with the build script in $GITLAB_RUNNER_BUILD_SH or ../shared/tools/gitlab-runner/build.sh,
# cached by that script's hash.
# Idempotent and quick when everything is there. Needs root.
#
# usage: scripts/testenv.sh [setup]     set up libvirt, the images and the templates (default)
#        scripts/testenv.sh setup tiny  the same without the systemd guest (make demo)
#        scripts/testenv.sh runner      find or build the gitlab-runner the tests drive
#        scripts/testenv.sh test        setup, building that gitlab-runner meanwhile (make test)
#        scripts/testenv.sh env         print the settings the tests use, as shell exports
#        scripts/testenv.sh libvirtd stop|start   stop libvirtd (its QEMUs go on), start it
#                                       again: the fault tests' restarted libvirtd
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
uri=qemu:///system
state=/var/lib/libvirt-gci
template=${LIBVIRT_GCI_TEST_TEMPLATE:-tiny-bookworm}
nic_template=$template-nic
isolated_net=gci-isolated
systemd_template=${LIBVIRT_GCI_TEST_SYSTEMD_TEMPLATE:-debian-bookworm}
dhcp_net=gci-dhcp
test_pool=${LIBVIRT_GCI_TEST_POOL:-gci-test}
packages=(libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils mmdebstrap
  e2fsprogs busybox-static cpio kmod xz-utils ca-certificates
  time openssh-server dnsmasq-base tini man-db init-system-helpers) # time: make bench's peak
# RSS of a stage; sshd: the qemu+ssh tests; dnsmasq: the DHCP of the systemd guest's
# network; man-db, init-system-helpers: the package test (man, deb-systemd-helper)

say() { echo "testenv: $*" >&2; }

install_packages() {
  local missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

start_daemons() {
  virsh -c "$uri" version >/dev/null 2>&1 && return 0
  if [[ -d /run/systemd/system ]]; then
    systemctl start virtlogd libvirtd
  else
    pgrep -x virtlogd >/dev/null || virtlogd -d
    # Under a subreaper, as systemd is on a real host: libvirtd's QEMUs are reparented to
    # tini, which reaps them at once. A container's init may reap late, and libvirt's
    # destroy waits for QEMU's reaping (it took 1.6 s here where systemd takes 30 ms).
    if ! pgrep -x libvirtd >/dev/null; then
      setsid tini -s -- libvirtd </dev/null >/dev/null 2>&1 &
    fi
  fi
  for _ in $(seq 100); do
    virsh -c "$uri" version >/dev/null 2>&1 && { say "libvirtd is up"; return 0; }
    sleep 0.1
  done
  say "libvirtd did not come up"; exit 1
}

# stop_libvirtd stops libvirtd the way its service's stop does (SIGTERM; its QEMUs go
# on), and waits until it is gone.
stop_libvirtd() {
  if [[ -d /run/systemd/system ]]; then
    systemctl stop libvirtd libvirtd.socket libvirtd-ro.socket libvirtd-admin.socket 2>/dev/null || true
    return 0
  fi
  pkill -TERM -x libvirtd || return 0
  for _ in $(seq 300); do
    pgrep -x libvirtd >/dev/null || return 0
    sleep 0.1
  done
  say "libvirtd did not stop in 30 s"; exit 1
}

# libvirt keeps QEMU's capabilities in a cache that is valid only while KVM is as usable
# (to QEMU's user, libvirt-qemu) as when QEMU was probed. Without udev (containers, this
# CI), /dev/kvm stays crw------- root:root, the check and the probe disagree, and libvirtd
# probes QEMU again on every define or lookup: seconds each, one at a time. udev's rule
# gives the device to the kvm group, mode 0660; do the same. The guests use TCG either way.
fix_kvm() {
  [[ -c /dev/kvm ]] || return 0
  getent group kvm >/dev/null || { say "no kvm group; cannot give /dev/kvm the mode udev would"; return 0; }
  local now
  now=$(stat -c '%G %a' /dev/kvm)
  [[ $now == "kvm 660" || $now == *" 666" ]] && return 0
  chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
  say "/dev/kvm was $now; made it kvm 660 as udev would, so libvirt stops probing QEMU on every call"
}

# A define must take milliseconds; a slow one makes every test slow and time out.
check_libvirt_speed() {
  local name=libvirt-gci-speedcheck-$$ xml t0 ms i
  xml=$(template_xml "$name")
  for i in 1 2; do # the first may probe QEMU once (its cache was just made valid)
    t0=$(date +%s%N)
    virsh -c "$uri" define /dev/stdin <<<"$xml" >/dev/null
    ms=$((($(date +%s%N) - t0) / 1000000))
    virsh -c "$uri" undefine "$name" >/dev/null
  done
  if ((ms > 2000)); then
    say "libvirt is slow: a define took $ms ms (want well under a second)."
    say "libvirtd is probably probing QEMU again on every call; its log says why after"
    say "  virt-admin daemon-log-filters 1:qemu.qemu_capabilities; see \"Slow libvirt\" in README.rst"
    exit 1
  fi
  say "libvirt is healthy: a define takes $ms ms"
}

# A guest image's directory: kind (tiny, debian) and the hash of the files of its
# builder (so that it is rebuilt only when they change).
image_dir_of() { # kind file...
  local kind=$1
  shift
  echo "$state/images/$kind-$(find "$@" -type f | LC_ALL=C sort | xargs cat | sha256sum | cut -c1-12)"
}

# Builds the image into dir with builder, unless it is there.
build_image() { # kind builder dir
  local kind=$1 builder=$2 dir=$3
  [[ ! -f $dir/root.qcow2 ]] || return 0
  say "building the $kind test guest image (tiny: about a minute; debian: about two)"
  rm -rf "$dir.tmp"
  "$builder" "$dir.tmp"
  mv "$dir.tmp" "$dir"
}

# Builds the images the tests need, at once (each is mostly waiting on apt and dpkg).
build_images() { # tiny|all
  local pids=() p failed=
  tiny_dir=$(image_dir_of tiny "$root"/make_base_image/{build.sh,initrd-init,inittab,rc.sysinit,agent})
  build_image tiny "$root/make_base_image/build.sh" "$tiny_dir" &
  pids+=($!)
  debian_dir=
  if [[ $1 != tiny ]]; then
    debian_dir=$(image_dir_of debian "$root/make_base_image/debian")
    build_image debian "$root/make_base_image/debian/build.sh" "$debian_dir" &
    pids+=($!)
  fi
  for p in "${pids[@]}"; do wait "$p" || failed=1; done
  [[ -z $failed ]] || { say "building a test guest image failed (see above)"; exit 1; }
  image_dir=$tiny_dir
}

ensure_pool() { # name path
  if ! virsh -c "$uri" pool-info "$1" >/dev/null 2>&1; then
    mkdir -p "$2"
    virsh -c "$uri" pool-define-as "$1" dir --target "$2" >/dev/null
    virsh -c "$uri" pool-autostart "$1" >/dev/null
  fi
  local info
  info=$(virsh -c "$uri" pool-info "$1")
  [[ $info =~ State:\ *running ]] || virsh -c "$uri" pool-start "$1" >/dev/null
}

# The test guest's image directory as a pool too: a libvirt reached over qemu+ssh tells a
# template disk's changes (for its warm image) only for a disk in a pool. The pool
# follows the image when a new builder makes another.
ensure_image_pool() { # name path
  if virsh -c "$uri" pool-dumpxml "$1" 2>/dev/null | grep -q "<path>$2</path>"; then
    ensure_pool "$1" "$2"
    return
  fi
  virsh -c "$uri" pool-destroy "$1" >/dev/null 2>&1 || true
  virsh -c "$uri" pool-undefine "$1" >/dev/null 2>&1 || true
  ensure_pool "$1" "$2"
}

# A test guest's domain: the image in $image_dir, its kernel and initrd booted directly.
guest_xml() { # name title MiB cmdline extra-devices
  cat <<EOF
<domain type='qemu'>
  <name>$1</name>
  <title>libvirt-gci test guest ($2)</title>
  <memory unit='MiB'>$3</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$image_dir/vmlinuz</kernel>
    <initrd>$image_dir/initrd.img</initrd>
    <cmdline>$4</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$image_dir/root.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb' model='none'/>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <serial type='pty'/>
    <memballoon model='none'/>$5
  </devices>
</domain>
EOF
}

# The tiny guest's template: 256 MiB, busybox init.
template_xml() { # name [extra devices]
  guest_xml "$1" "tiny Debian, busybox init" 256 "console=ttyS0 quiet" "${2:-}"
}

ensure_isolated_net() {
  if ! virsh -c "$uri" net-info "$isolated_net" >/dev/null 2>&1; then
    virsh -c "$uri" net-define /dev/stdin >/dev/null <<EOF
<network>
  <name>$isolated_net</name>
  <bridge name='gci-iso0' stp='off'/>
</network>
EOF
    virsh -c "$uri" net-autostart "$isolated_net" >/dev/null
  fi
  [[ $(virsh -c "$uri" net-info "$isolated_net") =~ Active:\ *yes ]] || virsh -c "$uri" net-start "$isolated_net" >/dev/null
}

# The systemd guest's template: 1 GiB, the distro's kernel and initrd booted directly,
# a NIC on the DHCP network, a virtio RNG.
systemd_template_xml() { # name
  guest_xml "$1" "Debian with systemd, networkd, the distro's kernel and initramfs" 1024 \
    "root=LABEL=gci-root rw console=ttyS0 quiet" "
    <interface type='network'><source network='$dhcp_net'/><model type='virtio'/></interface>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>"
}

# An isolated network whose dnsmasq hands out DHCP leases: no forward, no DNS (dnsmasq
# would forward queries out), nothing but the guests and the bridge.
ensure_dhcp_net() {
  if ! virsh -c "$uri" net-info "$dhcp_net" >/dev/null 2>&1; then
    virsh -c "$uri" net-define /dev/stdin >/dev/null <<EOF
<network>
  <name>$dhcp_net</name>
  <bridge name='gci-dhcp0' stp='off'/>
  <dns enable='no'/>
  <ip address='10.213.214.1' prefix='24'>
    <dhcp><range start='10.213.214.10' end='10.213.214.250'/></dhcp>
  </ip>
</network>
EOF
    virsh -c "$uri" net-autostart "$dhcp_net" >/dev/null
  fi
  [[ $(virsh -c "$uri" net-info "$dhcp_net") =~ Active:\ *yes ]] || virsh -c "$uri" net-start "$dhcp_net" >/dev/null
}

define_template() { # name [extra devices]
  local name=$1 want have
  if [[ $name == "$systemd_template" ]]; then want=$(systemd_template_xml "$name"); else want=$(template_xml "$@"); fi
  have=$(virsh -c "$uri" dumpxml --inactive "$name" 2>/dev/null || true)
  if [[ $have == *"$image_dir/root.qcow2"* && ( -z ${2:-} || $have == *"<interface"* ) ]]; then
    return 0
  fi
  if [[ -n $have ]]; then # an older build's template
    [[ $(virsh -c "$uri" domstate "$name") == "shut off" ]] || virsh -c "$uri" destroy "$name" >/dev/null
    virsh -c "$uri" undefine "$name" >/dev/null
  fi
  virsh -c "$uri" define /dev/stdin <<<"$want" >/dev/null
  say "defined template $name on $image_dir"
}

# Warm images are keyed by the binary that made them, and every test run builds a new
# one: those of earlier runs are never restored again, and would pile up.
remove_warm_images() {
  local v n=0
  for v in $(virsh -c "$uri" vol-list "$test_pool" 2>/dev/null | awk '$1 ~ /^libvirt-gci-warm-/ {print $1}'); do
    virsh -c "$uri" vol-delete --pool "$test_pool" "$v" >/dev/null 2>&1 && n=$((n + 1))
  done
  ((n == 0)) || say "removed $n volumes of earlier runs' warm images from pool $test_pool"
}

remove_old_images() {
  for d in "$state"/images/tiny-* "$state"/images/debian-*; do # images of older builders
    [[ $d == "$tiny_dir" || $d == "$debian_dir" || ( -z $debian_dir && $d == */debian-* ) ]] || rm -rf "$d"
  done
}

# The gitlab-runner the tests drive; with "build", build it if there is none.
find_runner() {
  runner=
  if [[ -n ${GITLAB_RUNNER_BIN:-} ]]; then
    [[ -x $GITLAB_RUNNER_BIN ]] || { say "GITLAB_RUNNER_BIN=$GITLAB_RUNNER_BIN is not an executable"; exit 1; }
    runner=$GITLAB_RUNNER_BIN
    return 0
  fi
  runner=$(command -v gitlab-runner) && return 0
  local build=${GITLAB_RUNNER_BUILD_SH:-$root/../shared/tools/gitlab-runner/build.sh}
  if [[ ! -f $build ]]; then
    # No build script here: take one built earlier, if any.
    runner=$(ls -t "$state"/tools/gitlab-runner-* 2>/dev/null | grep -v '\.tmp$' | head -1 || true)
    [[ -n $runner || ${1:-} != build ]] && return 0
    say "no gitlab-runner: set GITLAB_RUNNER_BIN, put gitlab-runner on PATH, or point"
    say "GITLAB_RUNNER_BUILD_SH at a script that builds one (none at $build)"
    exit 1
  fi
  local dir hash
  dir=$(dirname "$build")
  hash=$( (cat "$build"; [[ -d $dir/stubs ]] && find "$dir/stubs" -type f | sort | xargs cat) | sha256sum | cut -c1-12)
  runner=$state/tools/gitlab-runner-$hash
  [[ -x $runner || ${1:-} != build ]] && return 0
  say "building gitlab-runner from the Go module proxy (about 5 minutes, once)"
  mkdir -p "$state/tools"
  rm -f "$state"/tools/gitlab-runner-*
  bash "$build" "$runner.tmp" >&2
  mv "$runner.tmp" "$runner"
}

setup() {
  [[ $(id -u) == 0 ]] || { say "must run as root (apt-get, libvirtd, the image build)"; exit 1; }
  install_packages
  fix_kvm
  start_daemons
  build_images "${1:-all}"
  ensure_pool default /var/lib/libvirt/images
  ensure_pool "$test_pool" "$state/pool-$test_pool"
  ensure_image_pool gci-test-images "$image_dir"
  define_template "$template"
  ensure_isolated_net
  define_template "$nic_template" "
    <interface type='network'><source network='$isolated_net'/><model type='virtio'/></interface>"
  if [[ -n $debian_dir ]]; then
    ensure_dhcp_net
    image_dir=$debian_dir
    define_template "$systemd_template"
    image_dir=$tiny_dir
  fi
  remove_old_images
  remove_warm_images
  check_libvirt_speed
}

case ${1:-setup} in
  setup) setup "${2:-}" ;;
  test)
    # setup, and the gitlab-runner built meanwhile where there is none (make test): the
    # runner's build is Go compiling, the images' builds mostly apt and dpkg.
    (find_runner build >/dev/null) &
    runner_pid=$!
    setup
    wait "$runner_pid" || { say "building gitlab-runner failed (see above)"; exit 1; }
    find_runner
    say "gitlab-runner: $runner"
    ;;
  runner)
    find_runner build
    say "gitlab-runner: $runner"
    ;;
  libvirtd)
    case ${2:-} in
      stop) stop_libvirtd ;;
      start) start_daemons ;;
      *) echo "usage: $0 libvirtd stop|start" >&2; exit 2 ;;
    esac
    ;;
  env)
    echo "export LIBVIRT_GCI_URI=$uri LIBVIRT_GCI_TEST_TEMPLATE=$template LIBVIRT_GCI_TEST_NIC_TEMPLATE=$nic_template LIBVIRT_GCI_TEST_SYSTEMD_TEMPLATE=$systemd_template LIBVIRT_GCI_TEST_POOL=$test_pool"
    find_runner
    [[ -z $runner ]] || echo "export GITLAB_RUNNER_BIN=$runner"
    ;;
  *) echo "usage: $0 [setup [tiny]|runner|test|env|libvirtd stop|start]" >&2; exit 2 ;;
esac
