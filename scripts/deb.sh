#!/usr/bin/env bash
# Builds libvirt-gci's Debian package with dpkg-deb (`make deb`):
#   deb.sh BIN OUTDIR VERSION
# It holds what `make install` installs, with PREFIX=/usr and the units in
# /lib/systemd/system; /etc/default/libvirt-gci is a conffile (an upgrade keeps the
# operator's). It prints the package's path.
set -euo pipefail
bin=$1 outdir=$2 version=$3
here=$(cd "$(dirname "$0")" && pwd)
arch=$(dpkg --print-architecture)
stage=$(mktemp -d)
chmod 0755 "$stage"
trap 'rm -rf "$stage"' EXIT

"$here/install.sh" "$bin" "$stage" /usr /lib/systemd/system
install -m 0644 "$here/../COPYING" "$stage/usr/share/doc/libvirt-gci/copyright"
install -d "$stage/DEBIAN"
sed -e "s|@VERSION@|$version|" -e "s|@ARCH@|$arch|" "$here/package/control" >"$stage/DEBIAN/control"
echo "Installed-Size: $(du -sk --exclude=DEBIAN "$stage" | cut -f1)" >>"$stage/DEBIAN/control"
echo /etc/default/libvirt-gci >"$stage/DEBIAN/conffiles"
install -m 0755 "$here/package/postinst" "$here/package/prerm" "$here/package/postrm" "$stage/DEBIAN/"

mkdir -p "$outdir"
out=$outdir/libvirt-gci_${version}_$arch.deb
dpkg-deb --root-owner-group -Zxz --build "$stage" "$out" >/dev/null
echo "$out"
