#!/usr/bin/env bash
# Builds the systemd Debian guest that libvirt-gci's tests prove user-visible behaviour
# on, as a distribution's cloud image is: systemd as PID 1 with udev and D-Bus, Debian's
# cloud kernel and its initramfs-tools initrd, systemd-networkd with DHCP on every NIC,
# qemu-guest-agent and openssh-server started by their own units, git, curl and
# ca-certificates; an empty /etc/machine-id (systemd makes one at each first boot) and
# no SSH host keys (made at first boot, as cloud-init would).
#
# usage: make_base_image/debian/build.sh OUTDIR
#
# OUTDIR receives vmlinuz, initrd.img (the distro's, made by initramfs-tools in the
# image) and root.qcow2 (ext4, label gci-root), booted directly with
# "root=LABEL=gci-root rw". Needs root (mmdebstrap, mkfs.ext4 -d) but no loop mounts,
# no libguestfs and no KVM. About three minutes.
#
# env: SUITE (default bookworm), MIRROR (default: the host's apt mirror), SIZE (root fs, 4G)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=$(realpath -m "${1:?usage: debian/build.sh OUTDIR}")
suite=${SUITE:-bookworm}
size=${SIZE:-4G}
packages=systemd-sysv,udev,dbus,linux-image-cloud-amd64,initramfs-tools,iproute2,
packages+=qemu-guest-agent,openssh-server,git,curl,ca-certificates,procps,less

for tool in mmdebstrap mkfs.ext4 qemu-img; do
  command -v "$tool" >/dev/null || { echo "debian/build.sh: $tool is missing (run scripts/testenv.sh setup)" >&2; exit 1; }
done
[[ $(id -u) == 0 ]] || { echo "debian/build.sh: must run as root (mmdebstrap, mkfs.ext4 -d keep file owners)" >&2; exit 1; }

work=$(mktemp -d /var/tmp/gci-debian.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
start=$SECONDS
root=$work/root

mmdebstrap --quiet --variant=minbase --include="$packages" \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
  --customize-hook="cp -r '$here/rootfs/.' \"\$1/\"" \
  --customize-hook='chroot "$1" systemctl enable systemd-networkd.service gci-ssh-hostkeys.service >/dev/null 2>&1' \
  --customize-hook='rm -f "$1"/etc/ssh/ssh_host_*' \
  --customize-hook=': >"$1/etc/machine-id"; rm -f "$1/var/lib/dbus/machine-id"; ln -s /etc/machine-id "$1/var/lib/dbus/machine-id"' \
  --customize-hook='echo debian >"$1/etc/hostname"; printf "127.0.0.1 localhost\n127.0.1.1 debian\n" >"$1/etc/hosts"' \
  --customize-hook='mkdir -p "$1/builds" "$1/cache"; rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/journal/*' \
  --customize-hook='cp "$1"/boot/vmlinuz-* '"'$work/vmlinuz'"'; cp "$1"/boot/initrd.img-* '"'$work/initrd.img'"'' \
  "$suite" "$root" ${MIRROR:+"$MIRROR"}

truncate -s "$size" "$work/root.img"
mkfs.ext4 -q -L gci-root -d "$root" "$work/root.img"
qemu-img convert -O qcow2 "$work/root.img" "$work/root.qcow2"

mv "$work/vmlinuz" "$work/initrd.img" "$work/root.qcow2" "$out/"
echo "built $out (systemd Debian $suite, $(du -m "$out/root.qcow2" | cut -f1) MiB root) in $((SECONDS - start)) s" >&2
