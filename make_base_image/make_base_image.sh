#!/usr/bin/env bash
# make_base_image.sh VM...: turns prepared VMs into templates, as the Python
# libvirt-gci's script of this name did: each is shut down, its machine identity reset
# (machine-id, SSH host keys, logs, DHCP leases: through its guest agent if it runs,
# with virt-sysprep if it is shut off), and marked as a template. It is
# `libvirt-gci template make VM` for each; the LIBVIRT_GCI_* settings (URI, ...) apply.
# LIBVIRT_GCI_BIN names the binary if it is not on PATH.
set -euo pipefail
bin=${LIBVIRT_GCI_BIN:-libvirt-gci}
(($#)) || { echo "usage: $0 VM..." >&2; exit 2; }
failed=0
for vm in "$@"; do
  "$bin" template make "$vm" || { echo "$0: $vm was not made a template" >&2; failed=1; }
done
exit $failed
