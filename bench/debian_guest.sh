#!/bin/bash
# A Debian 12 guest with systemd for bench/warm.py --guest debian (opt-in): the stock boot of
# a real distribution (udev, journald, getty, qemu-guest-agent started by its udev rule), which
# takes about 10-20 s to reach its agent under TCG, where the test guests take 3.
#
# Made from Debian packages with mmdebstrap into a directory, then `mkfs.ext4 -d` (no loop
# mount) and qemu-img convert; booted directly with the Debian cloud kernel and initramfs the
# same packages installed. Needs root (mmdebstrap's root mode), mmdebstrap, e2fsprogs,
# qemu-utils and access to a Debian mirror.
#
# Usage: bench/debian_guest.sh OUTDIR     (writes debian.qcow2, vmlinuz, initrd.img, guest.json)
set -euo pipefail
out=${1:?usage: $0 OUTDIR}
[ "$(id -u)" -eq 0 ] || { echo "$0: run as root (mmdebstrap --mode=root)" >&2; exit 2; }
for tool in mmdebstrap mkfs.ext4 qemu-img; do
    command -v "$tool" >/dev/null || { echo "$0: $tool is missing" >&2; exit 2; }
done
mkdir -p "$out"
work=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
mmdebstrap --mode=root --variant=minbase \
    --include=systemd-sysv,udev,qemu-guest-agent,linux-image-cloud-amd64,initramfs-tools,passwd,iproute2,kmod \
    bookworm "$work/root"
echo debian-bench > "$work/root/etc/hostname"
printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' > "$work/root/etc/fstab"
cp "$work"/root/boot/vmlinuz-* "$out/vmlinuz"
cp "$work"/root/boot/initrd.img-* "$out/initrd.img"
mkfs.ext4 -q -L glite-root -d "$work/root" "$work/debian.raw" 2G
qemu-img convert -O qcow2 "$work/debian.raw" "$out/debian.qcow2"
chmod 0644 "$out/debian.qcow2" "$out/vmlinuz" "$out/initrd.img"
cat > "$out/guest.json" <<JSON
{"disk": "debian.qcow2", "kernel": "vmlinuz", "initrd": "initrd.img",
 "cmdline": "console=ttyS0 root=/dev/vda rw no_timer_check", "guest_user": "glite"}
JSON
echo "$0: done: $out"
