#!/usr/bin/env bash
# Builds the tiny Debian guest that libvirt-gci's tests (and its demo) run jobs in.
#
# usage: make_base_image/build.sh OUTDIR
#
# OUTDIR receives vmlinuz, initrd.img and root.qcow2: a direct-kernel-boot guest with
# busybox as init, qemu-guest-agent and openssh-server, and no systemd or udev. Needs root
# (mmdebstrap, mkfs.ext4 -d) but no loop mounts, no libguestfs and no KVM. About a minute.
#
# env: SUITE (default bookworm), MIRROR (default: the host's apt mirror), SIZE (root fs, 2G)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=$(realpath -m "${1:?usage: build.sh OUTDIR}")
suite=${SUITE:-bookworm}
size=${SIZE:-2G}
packages=qemu-guest-agent,openssh-server,busybox-static,git,ca-certificates
# Modules the initrd loads, in order, with their dependencies; whatever the kernel has
# built in is skipped.
modules="virtio_pci virtio_blk virtio_console virtio_net crc32c_generic ext4 virtiofs"

for tool in mmdebstrap mkfs.ext4 qemu-img cpio depmod modprobe dpkg-deb apt-get busybox; do
  command -v "$tool" >/dev/null || { echo "build.sh: $tool is missing (run scripts/testenv.sh setup)" >&2; exit 1; }
done
[[ $(id -u) == 0 ]] || { echo "build.sh: must run as root (mmdebstrap, mkfs.ext4 -d keep file owners)" >&2; exit 1; }

work=$(mktemp -d /var/tmp/gci-image.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
start=$SECONDS

# 1. Kernel: Debian's cloud kernel, taken from its .deb (virtio is modular there).
kernel_pkg() { apt-cache depends linux-image-cloud-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -1; }
kpkg=$(kernel_pkg)
[[ -n $kpkg ]] || { apt-get update -qq && kpkg=$(kernel_pkg); }
[[ -n $kpkg ]] || { echo "build.sh: no linux-image-cloud-amd64 in apt (run apt-get update)" >&2; exit 1; }
(cd "$work" && apt-get download -q -o APT::Sandbox::User=root "$kpkg" >/dev/null)
dpkg-deb -x "$work"/"$kpkg"_*.deb "$work/kernel"
kver=${kpkg#linux-image-}
kdir=$work/kernel/lib/modules/$kver
depmod -b "$work/kernel" "$kver"
cp "$work/kernel/boot/vmlinuz-$kver" "$work/vmlinuz"

# 2. Initrd: static busybox, the virtio and ext4 modules, and an /init that mounts /dev/vda.
ird=$work/initrd
mkdir -p "$ird"/{bin,dev,proc,sys,newroot,lib/modules}
cp /bin/busybox "$ird/bin/busybox"
: >"$ird/modules.order"
for m in $modules; do
  modprobe -d "$work/kernel" -S "$kver" --show-depends "$m" | while read -r kind path _; do
    [[ $kind == insmod ]] || continue   # "builtin NAME": nothing to load
    base=$(basename "$path")
    case $base in
      *.ko) ;;
      *.ko.xz) xz -dc "$path" >"$ird/lib/modules/${base%.xz}"; base=${base%.xz} ;;
      *) echo "build.sh: cannot handle module file $path" >&2; exit 1 ;;
    esac
    [[ -f $ird/lib/modules/$base ]] || cp "$path" "$ird/lib/modules/$base"
    grep -qx "$base" "$ird/modules.order" || echo "$base" >>"$ird/modules.order"
  done
done
install -m 0755 "$here/initrd-init" "$ird/init"
(cd "$ird" && find . | cpio -o -H newc --quiet | gzip -9) >"$work/initrd.img"

# 3. Root filesystem: minbase Debian, no docs, busybox init, the agent started by inittab.
mmdebstrap --quiet --variant=minbase --include="$packages" \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
  "$suite" "$work/root" ${MIRROR:+"$MIRROR"}
root=$work/root
ln -sf /bin/busybox "$root/sbin/init"
install -D -m 0644 "$here/inittab" "$root/etc/inittab"
install -D -m 0755 "$here/rc.sysinit" "$root/etc/gci/rc.sysinit"
install -D -m 0755 "$here/agent" "$root/etc/gci/agent"
echo gci-guest >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 gci-guest\n' >"$root/etc/hosts"
mkdir -p "$root/builds" "$root/cache"
truncate -s "$size" "$work/root.img"
mkfs.ext4 -q -L gci-root -d "$root" "$work/root.img"
qemu-img convert -c -O qcow2 "$work/root.img" "$work/root.qcow2"

mv "$work/vmlinuz" "$work/initrd.img" "$work/root.qcow2" "$out/"
echo "built $out ($kpkg, $(du -m "$out/root.qcow2" | cut -f1) MiB root) in $((SECONDS - start)) s" >&2
