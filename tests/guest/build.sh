#!/usr/bin/env bash
# tests/guest/build.sh OUTDIR
#
# Builds two tiny test guests for glite-vm from Debian packages only (apt-get download +
# dpkg-deb -x, nothing is installed into the host, no loop devices, no mounts):
#
#   (a) "direct": vmlinuz + initrd.img (busybox, qemu-ga and its libraries, virtio modules,
#       an init script) for direct kernel boot, plus direct-disk.qcow2 (ext4 data disk that
#       holds /home, /root, /tmp and /var/tmp);
#   (b) "disk":   disk-boot.qcow2, an MBR disk that boots by itself: syslinux on a FAT
#       partition (kernel + small initramfs), ext4 root file system on partition 2.
#
# Both start qemu-guest-agent on the virtio-serial port org.qemu.guest_agent.0 unless the
# kernel command line contains "glite_noagent"; more glite_* words make the direct guest
# broken in other ways (tests/guest/README.md).  Both boot with "no_timer_check" (under CPU
# contention a TCG guest's kernel can fail its timer check and panic).  The disk guest has
# useradd/groupadd (Debian's passwd package).  OUTDIR/guests.json describes the outputs.
#
# Cached and idempotent: OUTDIR/.build-stamp holds the sha256 of this script; when it matches
# and all outputs exist the script exits at once.  Downloaded .debs are kept in OUTDIR/debs.
# Outputs are built in OUTDIR/.build.* and moved into place; guests.json and the stamp are
# written last, so an interrupted build never looks finished.
#
# Needs root (file ownership/device nodes in the guest file systems, chroot self-test) and:
# apt-get, dpkg-deb, cpio, gzip, qemu-img (qemu-utils), mkfs.ext4 (e2fsprogs), mkfs.fat
# (dosfstools), sfdisk (fdisk), mtools, syslinux, syslinux-common, and the shared libraries of
# qemu-ga on the host (present wherever qemu-system-x86 is installed).
set -euo pipefail

PROG=${0##*/}
die() { echo "$PROG: ERROR: $*" >&2; exit 1; }
log() { echo "$PROG: $*" >&2; }

[ $# -eq 1 ] || die "usage: $PROG OUTDIR"

SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
SCRIPT_SHA=$(sha256sum "$SCRIPT" | cut -d' ' -f1)
mkdir -p "$1"
OUTDIR=$(cd "$1" && pwd)
STAMP=$OUTDIR/.build-stamp
OUTPUTS=(vmlinuz initrd.img direct-disk.qcow2 disk-boot.qcow2 guests.json)

# ---- guest parameters -----------------------------------------------------------------
GUEST_USER=glite
GUEST_UID=1000
AGENT_PORT_NAME=org.qemu.guest_agent.0
NOAGENT_FLAG=glite_noagent
DIRECT_CMDLINE="console=ttyS0 no_timer_check"
DISK_CMDLINE="console=ttyS0 root=LABEL=glite-root no_timer_check"
MODULES="virtio_pci virtio_console virtio_blk virtio_net ext4"
DATA_DISK_SIZE=1G
BOOT_DISK_SIZE_MIB=1024
BOOT_PART_START=2048            # sectors (1 MiB)
BOOT_PART_SECTORS=$((64 * 2048)) # 64 MiB FAT16 for kernel + initramfs
SYSLINUX_MBR=/usr/lib/syslinux/mbr/mbr.bin

is_done() {
    [ "$(cat "$STAMP" 2>/dev/null)" = "$SCRIPT_SHA" ] || return 1
    local f
    for f in "${OUTPUTS[@]}"; do [ -s "$OUTDIR/$f" ] || return 1; done
}

is_done && exit 0

# One build per OUTDIR at a time; re-check after getting the lock.
exec 9>"$OUTDIR/.lock"
flock 9
if is_done; then exit 0; fi

# ---- preconditions ----------------------------------------------------------------------
[ "$(id -u)" = 0 ] || die "must run as root (guest file systems need root-owned files, a uid-$GUEST_UID home and device nodes)"
missing=()
need() { command -v "$1" >/dev/null 2>&1 || missing+=("$1 (Debian package $2)"); }
need apt-get apt;       need apt-cache apt;   need dpkg-deb dpkg
need cpio cpio;         need gzip gzip;       need qemu-img qemu-utils
need mkfs.ext4 e2fsprogs; need mkfs.fat dosfstools; need sfdisk fdisk
need mcopy mtools;      need syslinux syslinux; need ldd libc-bin
need chroot coreutils;  need flock util-linux; need sha256sum coreutils
[ -r "$SYSLINUX_MBR" ] || missing+=("$SYSLINUX_MBR (Debian package syslinux-common)")
[ ${#missing[@]} -eq 0 ] || die "missing on this host: ${missing[*]}"

T0=$(date +%s)
rm -f "$STAMP" "$OUTDIR/guests.json"
rm -rf "$OUTDIR"/.build.*
WORK=$(mktemp -d "$OUTDIR/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM HUP
DEBS=$OUTDIR/debs
mkdir -p "$DEBS" "$WORK/out"

# ---- apt helpers --------------------------------------------------------------------------
APT_OPTS=(-q -o APT::Sandbox::User=root)
APT_UPDATED=0
apt_update() {
    [ "$APT_UPDATED" = 0 ] || return 1
    APT_UPDATED=1
    log "running apt-get update"
    apt-get "${APT_OPTS[@]}" update >&2 || log "warning: apt-get update failed"
}

# fetch_deb PKG -> prints the path of PKG's .deb in $DEBS (downloading it if needed)
fetch_deb() {
    local pkg=$1 fn f attempt
    for attempt in 1 2; do
        fn=$(apt-get "${APT_OPTS[@]}" download --print-uris "$pkg" 2>/dev/null | awk 'NR==1 {print $2}') || fn=
        if [ -n "$fn" ]; then
            if [ -s "$DEBS/$fn" ]; then echo "$DEBS/$fn"; return 0; fi
            rm -rf "$DEBS/.partial"; mkdir -p "$DEBS/.partial"
            if (cd "$DEBS/.partial" && apt-get "${APT_OPTS[@]}" download "$pkg" >&2); then
                f=$(ls -1 "$DEBS/.partial"/*.deb | head -n1)
                mv "$f" "$DEBS/"
                rm -rf "$DEBS/.partial"
                echo "$DEBS/${f##*/}"; return 0
            fi
        fi
        [ "$attempt" = 1 ] && apt_update || true
    done
    f=$(ls -1 "$DEBS/${pkg}_"*.deb 2>/dev/null | sort -V | tail -n1) || true
    if [ -n "$f" ]; then log "warning: apt-get cannot fetch $pkg, using cached ${f##*/}"; echo "$f"; return 0; fi
    die "cannot download $pkg with apt-get (and no cached .deb in $DEBS)"
}

# The meta package linux-image-cloud-amd64 depends on the versioned kernel package.
resolve_kernel_pkg() {
    local n attempt f
    for attempt in 1 2; do
        n=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
            | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-cloud-amd64$/ {print $2; exit}') || n=
        if [ -n "$n" ]; then echo "$n"; return 0; fi
        [ "$attempt" = 1 ] && apt_update || true
    done
    f=$(ls -1 "$DEBS"/linux-image-[0-9]*-cloud-amd64_*.deb 2>/dev/null | sort -V | tail -n1) || true
    if [ -n "$f" ]; then f=${f##*/}; echo "${f%%_*}"; return 0; fi
    die "cannot resolve the package behind linux-image-cloud-amd64 (apt-cache depends failed)"
}

# ---- download and extract ------------------------------------------------------------------
KPKG=$(resolve_kernel_pkg)
KVER=${KPKG#linux-image-}
log "kernel package $KPKG"
KDEB=$(fetch_deb "$KPKG")
BBDEB=$(fetch_deb busybox-static)
QGADEB=$(fetch_deb qemu-guest-agent)
PASSWDDEB=$(fetch_deb passwd)

X=$WORK/x
mkdir -p "$X/kernel" "$X/busybox" "$X/qga" "$X/passwd"
dpkg-deb --fsys-tarfile "$KDEB" | tar -x -C "$X/kernel" ./boot ./lib/modules
dpkg-deb -x "$BBDEB" "$X/busybox"
dpkg-deb -x "$QGADEB" "$X/qga"
dpkg-deb -x "$PASSWDDEB" "$X/passwd"

VMLINUZ=$X/kernel/boot/vmlinuz-$KVER
KMODDIR=$X/kernel/lib/modules/$KVER
BB=$X/busybox/bin/busybox
QGA=$X/qga/usr/sbin/qemu-ga
UDHCPC_SCRIPT=$X/busybox/usr/share/doc/busybox-static/examples/udhcp/simple.script
USERADD=$X/passwd/usr/sbin/useradd
GROUPADD=$X/passwd/usr/sbin/groupadd
for f in "$VMLINUZ" "$BB" "$QGA" "$UDHCPC_SCRIPT" "$USERADD" "$GROUPADD"; do
    [ -f "$f" ] || die "expected file missing after extracting the packages: ${f#"$X"/}"
done
[ -d "$KMODDIR" ] || die "no modules directory lib/modules/$KVER in $KPKG"

# ---- kernel modules: modules.dep and load order ------------------------------------------
# The .deb ships no modules.dep (depmod runs at install time), so generate it with the
# extracted (static) busybox depmod, then resolve the wanted modules recursively.
"$BB" depmod -b "$X/kernel" "$KVER"
[ -s "$KMODDIR/modules.dep" ] || die "depmod produced no modules.dep"

declare -A MOD_DEPS=() MOD_PATH=() MOD_SEEN=()
while IFS= read -r line; do
    p=${line%%:*}
    MOD_DEPS[$p]=${line#*:}
    n=${p##*/}; n=${n%%.ko*}; n=${n//-/_}
    MOD_PATH[$n]=$p
done < "$KMODDIR/modules.dep"
MOD_ORDER=()
visit_mod() {
    local p=$1 d
    [ -z "${MOD_SEEN[$p]:-}" ] || return 0
    MOD_SEEN[$p]=1
    for d in ${MOD_DEPS[$p]}; do
        [ -n "${MOD_DEPS[$d]+x}" ] || die "modules.dep: $p needs $d, which is not listed"
        visit_mod "$d"
    done
    MOD_ORDER+=("$p")
}
for m in $MODULES; do
    if [ -n "${MOD_PATH[$m]:-}" ]; then
        visit_mod "${MOD_PATH[$m]}"
    elif sed 's#.*/##; s#\.ko.*##; s#-#_#g' "$KMODDIR/modules.builtin" | grep -qx "$m"; then
        log "module $m is built into $KVER"
    else
        die "kernel module $m not found in $KPKG"
    fi
done
log "modules to load: ${MOD_ORDER[*]##*/}"

# install_modules ROOT: copies the modules (with their tree) and the ordered load list
install_modules() {
    local root=$1 p
    for p in "${MOD_ORDER[@]}"; do
        mkdir -p "$root/lib/modules/$KVER/${p%/*}"
        cp "$KMODDIR/$p" "$root/lib/modules/$KVER/$p"
    done
    cp "$KMODDIR/modules.builtin" "$root/lib/modules/$KVER/"
    # modules.dep restricted to the modules we ship
    grep -F -f <(printf '%s:\n' "${MOD_ORDER[@]}") "$KMODDIR/modules.dep" > "$root/lib/modules/$KVER/modules.dep" || true
    printf '%s\n' "${MOD_ORDER[@]}" > "$root/etc/glite-guest/modules"
}

# ---- shared libraries of qemu-ga and the account tools (from the host, same Debian release)
# host_libs BINARY...: sets HOST_LIBS to the libraries the binaries need (dies if one is missing)
host_libs() {
    local line l bin
    HOST_LIBS=()
    local notfound=()
    for bin in "$@"; do
        while read -r line; do
            case $line in
                *"=> not found"*) notfound+=("${line%% *}") ;;
                *"=> /"*) l=${line#*=> }; HOST_LIBS+=("${l%% (*}") ;;
                /*) HOST_LIBS+=("${line%% (*}") ;;
            esac
        done < <(ldd "$bin")
    done
    [ ${#notfound[@]} -eq 0 ] || die "${*##*/} need libraries missing on this host: ${notfound[*]} (install qemu-system-x86 and passwd / the packages they depend on)"
    [ ${#HOST_LIBS[@]} -gt 0 ] || die "ldd found no libraries for ${*##*/}"
}
host_libs "$QGA"
QGA_LIBS=("${HOST_LIBS[@]}")
host_libs "$USERADD" "$GROUPADD"
ACCOUNT_LIBS=("${HOST_LIBS[@]}")

# ---- guest scripts ----------------------------------------------------------------------
write_common_sh() {
    cat > "$1" <<'EOF'
# /etc/glite-guest/common.sh - sourced by the glite test guests' init scripts (busybox sh)
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
umask 022

say() { echo "glite-guest: $*"; }

mount_basics() {
    mkdir -p /proc /sys /dev /run
    mount -t proc -o nosuid,nodev,noexec proc /proc
    mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
    mount -t devtmpfs -o mode=755,nosuid devtmpfs /dev
    mkdir -p /dev/pts /dev/shm
    mount -t devpts -o gid=5,mode=620 devpts /dev/pts
    mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
    mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /run
    mkdir -p /run/lock
}

# insmod the modules listed (dependencies first) in /etc/glite-guest/modules
load_modules() {
    kver=$(uname -r)
    n=0
    while read -r rel; do
        [ -n "$rel" ] || continue
        name=${rel##*/}; name=${name%.ko}; name=$(echo "$name" | tr - _)
        [ -d "/sys/module/$name" ] && continue
        if insmod "/lib/modules/$kver/$rel"; then n=$((n + 1)); else say "WARNING: insmod $rel failed"; fi
    done < /etc/glite-guest/modules
    say "loaded $n kernel modules"
}

has_flag() { grep -qw -- "$1" /proc/cmdline; }

start_services() {
    hostname -F /etc/hostname
    ifconfig lo 127.0.0.1 up 2>/dev/null || true
    # Broken on purpose, for the tests of images nobody tuned for glite-vm:
    if has_flag glite_nouser; then  # an image without the job's account
        for f in /etc/passwd /etc/group /etc/shadow; do
            grep -v '^glite:' "$f" > "$f.new" && cat "$f.new" > "$f" && rm -f "$f.new"
        done
        say "glite_nouser on the kernel command line: removed the account glite"
    fi
    if has_flag glite_ro_etc; then  # an image whose /etc cannot be written
        mount --bind /etc /etc && mount -o remount,ro,bind /etc
        say "glite_ro_etc on the kernel command line: /etc is read-only"
    fi
    if has_flag glite_noagent; then
        say "glite_noagent on the kernel command line: NOT starting the agent"
    else
        /usr/sbin/glite-agent </dev/null >/dev/console 2>&1 &
    fi
    if has_flag glite_getty; then  # a login prompt on the serial console, as images show
        (while :; do getty -L 115200 ttyS0 vt100; sleep 1; done) </dev/null >/dev/null 2>&1 &
    fi
}

pid1_shutdown() {
    say "$1 requested"
    sync
    umount -a -r 2>/dev/null
    sync
    "$1" -f
}

# PID 1 main loop: "wait" in busybox ash blocks in waitpid(-1), so orphans get reaped.
# busybox poweroff/halt/reboot (without -f) signal PID 1 with USR2/USR1/TERM.
pid1_loop() {
    trap 'pid1_shutdown poweroff' USR2
    trap 'pid1_shutdown halt' USR1
    trap 'pid1_shutdown reboot' TERM
    (while :; do sleep 86400; done) </dev/null &
    say "init done"
    while :; do wait; done
}
EOF
}

write_agent_loop() {
    cat > "$1" <<'EOF'
#!/bin/sh
# /usr/sbin/glite-agent - keeps qemu-ga running on the virtio-serial port named
# org.qemu.guest_agent.0 (found through /sys/class/virtio-ports, there is no udev).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
NAME=org.qemu.guest_agent.0

find_port() {
    for f in /sys/class/virtio-ports/*/name; do
        [ -r "$f" ] || continue
        if [ "$(cat "$f" 2>/dev/null)" = "$NAME" ]; then
            d=${f%/name}
            echo "/dev/${d##*/}"
            return 0
        fi
    done
    return 1
}

told=
while :; do
    port=$(find_port) || port=
    if [ -z "$port" ] || [ ! -c "$port" ]; then
        [ -n "$told" ] || echo "glite-guest: waiting for virtio port $NAME"
        told=1
        sleep 1
        continue
    fi
    told=
    echo "glite-guest: agent started (qemu-ga on $port)"
    /usr/sbin/qemu-ga -m virtio-serial -p "$port"
    echo "glite-guest: agent exited (status $?), restarting"
    sleep 1
done
EOF
    chmod 755 "$1"
}

write_shutdown() {
    cat > "$1" <<'EOF'
#!/bin/sh
# /sbin/shutdown - what qemu-ga's guest-shutdown runs ("-h -P|-H +0 msg" or "-r +0 msg").
# Signals PID 1 the way busybox poweroff/halt/reboot do.
sig=USR2
for a in "$@"; do
    case $a in
        -r) sig=TERM ;;
        -H) sig=USR1 ;;
    esac
done
kill -"$sig" 1
EOF
    chmod 755 "$1"
}

# make_base ROOT: directories, busybox + applet symlinks, users, common scripts
make_base() {
    local r=$1 a
    mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,etc/glite-guest,proc,sys,dev,run,tmp,root,home/$GUEST_USER,var/tmp,var/log,var/lib,mnt,lib}
    ln -s ../run "$r/var/run"
    ln -s ../run/lock "$r/var/lock"
    chmod 1777 "$r/tmp" "$r/var/tmp"
    chmod 700 "$r/root"
    chown "$GUEST_UID:$GUEST_UID" "$r/home/$GUEST_USER"
    mknod -m 600 "$r/dev/console" c 5 1
    mknod -m 666 "$r/dev/null" c 1 3

    cp "$BB" "$r/bin/busybox"
    chmod 755 "$r/bin/busybox"
    while read -r a; do
        [ -n "$a" ] && [ "$a" != bin/busybox ] || continue
        mkdir -p "$r/$(dirname "$a")"
        [ -e "$r/$a" ] || [ -L "$r/$a" ] || ln -s /bin/busybox "$r/$a"
    done < <("$BB" --list-full)

    cat > "$r/etc/passwd" <<EOF
root:x:0:0:root:/root:/bin/sh
$GUEST_USER:x:$GUEST_UID:$GUEST_UID:glite job user:/home/$GUEST_USER:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
    cat > "$r/etc/group" <<EOF
root:x:0:
tty:x:5:
$GUEST_USER:x:$GUEST_UID:
nogroup:x:65534:
EOF
    cat > "$r/etc/shadow" <<EOF
root:*:19000:0:99999:7:::
$GUEST_USER:!:19000:0:99999:7:::
nobody:*:19000:0:99999:7:::
EOF
    chmod 644 "$r/etc/passwd" "$r/etc/group"
    chmod 600 "$r/etc/shadow"
    printf '/bin/sh\n/bin/ash\n' > "$r/etc/shells"
    echo glite-guest > "$r/etc/hostname"
    printf '127.0.0.1\tlocalhost\n127.0.1.1\tglite-guest\n' > "$r/etc/hosts"
    : > "$r/etc/resolv.conf"
    echo 'export PATH=/usr/sbin:/usr/bin:/sbin:/bin' > "$r/etc/profile"

    mkdir -p "$r/usr/share/udhcpc"
    install -m 755 "$UDHCPC_SCRIPT" "$r/usr/share/udhcpc/default.script"
    # busybox udhcpc looks for /etc/udhcpc/default.script
    mkdir -p "$r/etc/udhcpc"
    ln -sf /usr/share/udhcpc/default.script "$r/etc/udhcpc/default.script"

    write_common_sh "$r/etc/glite-guest/common.sh"
    write_shutdown "$r/sbin/shutdown"
}

# copy_libs ROOT LIB...: host libraries into the guest at the same paths
copy_libs() {
    local r=$1 l
    shift
    for l in "$@"; do
        mkdir -p "$r$(dirname "$l")"
        cp -L "$l" "$r$l"
    done
}

# add_agent ROOT: qemu-ga, its libraries and the restart loop
add_agent() {
    local r=$1
    install -m 755 "$QGA" "$r/usr/sbin/qemu-ga"
    copy_libs "$r" "${QGA_LIBS[@]}"
    write_agent_loop "$r/usr/sbin/glite-agent"
}

# add_account_tools ROOT: useradd and groupadd (Debian's passwd package) with their libraries
add_account_tools() {
    local r=$1
    install -m 755 "$USERADD" "$r/usr/sbin/useradd"
    install -m 755 "$GROUPADD" "$r/usr/sbin/groupadd"
    mkdir -p "$r/etc/default"
    install -m 644 "$X/passwd/etc/default/useradd" "$r/etc/default/useradd"
    printf 'UID_MIN 1000\nUID_MAX 60000\nGID_MIN 1000\nGID_MAX 60000\nCREATE_HOME yes\n' > "$r/etc/login.defs"
    mkdir -p "$r/etc/skel"
    copy_libs "$r" "${ACCOUNT_LIBS[@]}"
}

# self_test ROOT: run the guest's own binaries in a chroot (no mounts needed)
self_test() {
    local r=$1 out
    out=$(chroot "$r" /usr/sbin/qemu-ga --version 2>&1) || die "qemu-ga does not run in $r: $out"
    out=$(chroot "$r" /bin/su -s /bin/sh "$GUEST_USER" -c 'id -u' 2>&1) || die "su to $GUEST_USER fails in $r: $out"
    [ "$out" = "$GUEST_UID" ] || die "su $GUEST_USER gave uid '$out', expected $GUEST_UID"
}

# make_cpio ROOT OUT: gzip-compressed newc initramfs, ownership as in ROOT
make_cpio() {
    (cd "$1" && find . -mindepth 1 -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) | gzip -9n > "$2"
}

# ---- guest (a): direct kernel boot -----------------------------------------------------
log "building the direct-boot guest"
R=$WORK/direct-root
make_base "$R"
add_agent "$R"
install_modules "$R"
cat > "$R/init" <<'EOF'
#!/bin/sh
# /init of the glite "direct" test guest (initramfs, direct kernel boot)
. /etc/glite-guest/common.sh
mount_basics
say "direct-boot guest, kernel $(uname -r)"
load_modules

# Data disk: ext4 labelled glite-data (normally /dev/vda); everything a job writes goes there.
i=0
while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
dev=$(findfs LABEL=glite-data 2>/dev/null) || dev=/dev/vda
mkdir -p /data
if [ -b "$dev" ] && mount -t ext4 -o rw "$dev" /data; then
    mkdir -p /data/home /data/root /data/tmp /data/var-tmp
    if [ ! -d /data/home/glite ]; then mkdir /data/home/glite; chown 1000:1000 /data/home/glite; fi
    chmod 1777 /data/tmp /data/var-tmp
    chmod 700 /data/root
    mount --bind /data/home /home
    mount --bind /data/root /root
    mount --bind /data/tmp /tmp
    mount --bind /data/var-tmp /var/tmp
    say "data disk $dev mounted on /data (/home /root /tmp /var/tmp bound to it)"
else
    say "WARNING: no data disk ($dev), job files stay in RAM"
fi

start_services
pid1_loop
EOF
chmod 755 "$R/init"
self_test "$R"
make_cpio "$R" "$WORK/out/initrd.img"
cp "$VMLINUZ" "$WORK/out/vmlinuz"

D=$WORK/direct-data
mkdir -p "$D/home/$GUEST_USER" "$D/root" "$D/tmp" "$D/var-tmp"
chown "$GUEST_UID:$GUEST_UID" "$D/home/$GUEST_USER"
chmod 700 "$D/root"
chmod 1777 "$D/tmp" "$D/var-tmp"
truncate -s "$DATA_DISK_SIZE" "$WORK/direct-disk.raw"
mkfs.ext4 -q -F -L glite-data -E nodiscard -d "$D" "$WORK/direct-disk.raw"
qemu-img convert -f raw -O qcow2 "$WORK/direct-disk.raw" "$WORK/out/direct-disk.qcow2"
rm -f "$WORK/direct-disk.raw"

# ---- guest (b): boots from its own disk (syslinux + ext4 root) ---------------------------
log "building the disk-boot guest"
# small initramfs: busybox + virtio modules, mounts the root fs and switch_roots
I=$WORK/disk-initrd
mkdir -p "$I"/{bin,sbin,usr/bin,usr/sbin,etc/glite-guest,proc,sys,dev,newroot,lib}
mknod -m 600 "$I/dev/console" c 5 1
mknod -m 666 "$I/dev/null" c 1 3
cp "$BB" "$I/bin/busybox"
while read -r a; do
    [ -n "$a" ] && [ "$a" != bin/busybox ] || continue
    mkdir -p "$I/$(dirname "$a")"
    ln -s /bin/busybox "$I/$a"
done < <("$BB" --list-full)
write_common_sh "$I/etc/glite-guest/common.sh"
install_modules "$I"
cat > "$I/init" <<'EOF'
#!/bin/sh
# /init of the glite "disk" test guest's initramfs: load virtio, mount the root fs, switch_root
. /etc/glite-guest/common.sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say "disk-boot initramfs, kernel $(uname -r)"
load_modules

root=
for w in $(cat /proc/cmdline); do
    case $w in root=*) root=${w#root=} ;; esac
done
[ -n "$root" ] || root=LABEL=glite-root
dev=
i=0
while [ $i -lt 100 ]; do
    case $root in
        LABEL=*|UUID=*) dev=$(findfs "$root" 2>/dev/null) || dev= ;;
        *) [ -b "$root" ] && dev=$root ;;
    esac
    [ -n "$dev" ] && break
    sleep 0.1; i=$((i + 1))
done
[ -n "$dev" ] || { [ -b /dev/vda2 ] && dev=/dev/vda2; }
if [ -z "$dev" ] || ! mount -t ext4 -o rw "$dev" /newroot; then
    say "FATAL: cannot mount the root file system ($root)"
    while :; do sleep 3600; done
fi
say "root file system $dev mounted, switching root"
umount /proc /sys /dev
exec switch_root /newroot /sbin/init
EOF
chmod 755 "$I/init"
make_cpio "$I" "$WORK/disk-initrd.img"

# root file system of the disk guest
R2=$WORK/disk-root
make_base "$R2"
add_agent "$R2"
add_account_tools "$R2"
rm -f "$R2/sbin/init"
cat > "$R2/sbin/init" <<'EOF'
#!/bin/sh
# /sbin/init of the glite "disk" test guest (ext4 root on /dev/vda2)
. /etc/glite-guest/common.sh
mount -o remount,rw / 2>/dev/null
mount_basics
chmod 1777 /tmp /var/tmp
say "disk-boot guest root file system up, kernel $(uname -r)"
start_services
pid1_loop
EOF
chmod 755 "$R2/sbin/init"
self_test "$R2"
out=$(chroot "$R2" /usr/sbin/useradd --help 2>&1) || die "useradd does not run in the disk guest: $out"

SECT=512
TOTAL_SECTORS=$((BOOT_DISK_SIZE_MIB * 2048))
P2_START=$((BOOT_PART_START + BOOT_PART_SECTORS))
P2_SECTORS=$((TOTAL_SECTORS - P2_START))
RAW=$WORK/disk-boot.raw
truncate -s "${BOOT_DISK_SIZE_MIB}M" "$RAW"
sfdisk -q --no-reread --no-tell-kernel "$RAW" >/dev/null <<EOF
label: dos
start=$BOOT_PART_START, size=$BOOT_PART_SECTORS, type=e, bootable
start=$P2_START, size=$P2_SECTORS, type=83
EOF
dd if="$SYSLINUX_MBR" of="$RAW" bs=440 count=1 conv=notrunc status=none

# partition 1: FAT16 with syslinux, kernel, initramfs (mtools only, no mounting)
# (mkfs.fat warns that the file is larger than the file system: expected, so keep it quiet)
mkfs.fat -F 16 -n GLITEBOOT -h "$BOOT_PART_START" --offset "$BOOT_PART_START" "$RAW" $((BOOT_PART_SECTORS / 2)) \
    >"$WORK/mkfs.fat.log" 2>&1 || { cat "$WORK/mkfs.fat.log" >&2; die "mkfs.fat failed"; }
export MTOOLS_SKIP_CHECK=1
FAT="$RAW@@$((BOOT_PART_START * SECT))"
cat > "$WORK/syslinux.cfg" <<EOF
SERIAL 0 115200
PROMPT 0
TIMEOUT 0
DEFAULT glite
LABEL glite
  LINUX /vmlinuz
  INITRD /initrd.img
  APPEND $DISK_CMDLINE
EOF
mcopy -i "$FAT" "$VMLINUZ" ::/vmlinuz
mcopy -i "$FAT" "$WORK/disk-initrd.img" ::/initrd.img
mcopy -i "$FAT" "$WORK/syslinux.cfg" ::/syslinux.cfg
syslinux --install --offset $((BOOT_PART_START * SECT)) "$RAW"
mdir -a -b -i "$FAT" ::/ | grep -qi ldlinux.sys || die "syslinux did not install ldlinux.sys"

# partition 2: ext4 root file system written in place
mkfs.ext4 -q -F -L glite-root -E nodiscard,offset=$((P2_START * SECT)) -d "$R2" "$RAW" $((P2_SECTORS / 2))k
qemu-img convert -f raw -O qcow2 "$RAW" "$WORK/out/disk-boot.qcow2"
rm -f "$RAW"

# ---- publish ------------------------------------------------------------------------------
for f in vmlinuz initrd.img direct-disk.qcow2 disk-boot.qcow2; do
    mv -f "$WORK/out/$f" "$OUTDIR/$f"
done
sha() { sha256sum "$OUTDIR/$1" | cut -d' ' -f1; }
cat > "$WORK/guests.json" <<EOF
{
  "format": 1,
  "user": "$GUEST_USER",
  "uid": $GUEST_UID,
  "kernel_version": "$KVER",
  "agent_channel": "$AGENT_PORT_NAME",
  "noagent_flag": "$NOAGENT_FLAG",
  "direct": {
    "kernel": "vmlinuz",
    "initrd": "initrd.img",
    "disk": "direct-disk.qcow2",
    "cmdline": "$DIRECT_CMDLINE"
  },
  "disk": {
    "disk": "disk-boot.qcow2",
    "cmdline": "$DISK_CMDLINE"
  },
  "sha256": {
    "vmlinuz": "$(sha vmlinuz)",
    "initrd.img": "$(sha initrd.img)",
    "direct-disk.qcow2": "$(sha direct-disk.qcow2)",
    "disk-boot.qcow2": "$(sha disk-boot.qcow2)"
  }
}
EOF
mv -f "$WORK/guests.json" "$OUTDIR/guests.json"
echo "$SCRIPT_SHA" > "$WORK/stamp"
mv -f "$WORK/stamp" "$STAMP"
log "done in $(( $(date +%s) - T0 )) s: $(cd "$OUTDIR" && du -ch vmlinuz initrd.img direct-disk.qcow2 disk-boot.qcow2 | tail -n1 | cut -f1) in $OUTDIR"
