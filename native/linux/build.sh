#!/bin/bash
# Builds the Linux guest the Linux-boot work uses, from Debian's packages:
#   OUT/bzImage            Debian's cloud kernel as shipped (linux-image-cloud-amd64)
#   OUT/vmlinux            the same kernel uncompressed: an ELF with a PVH entry note
#   OUT/config, OUT/System.map
#   OUT/initramfs.cpio.gz  busybox (busybox-static), the virtio modules, /bin/kvm-exit (native/linux/
#                          kvm-exit.c, built static), /bin/kvm-flood (native/linux/kvm-flood.c),
#                          /bin/kvm-rr (native/linux/kvm-rr.c) and
#                          Debian's iperf3 with the shared libraries it loads (glibc's among them; a
#                          stub for libcrypto), with native/linux/init
#   OUT/kvm-rr             the same kvm-rr, for the network benchmark's peer on the host
#   OUT/kvm-host.cpio.gz   the nested KVM host's initramfs (tests/kvm-host), with native/linux/kvm-host-init
#                          and /bin/kvm-hold (native/linux/kvm-hold.c, static)
# Usage: native/linux/build.sh [OUT]   (default build/linux; `make linux` runs it)
# Needs: apt-get (with package lists: run apt-get update first), dpkg, lz4, gzip, binutils (readelf,
# nm, strings), and a C compiler with a static libc ($CC, default gcc; Debian's libc6-dev).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=$(mkdir -p "${1:-build/linux}" && cd "${1:-build/linux}" && pwd)
work="$out/work"
rm -rf "$work"
mkdir -p "$work/debs" "$work/root"

die() { echo "linux guest: $*" >&2; exit 1; }
cc=${CC:-gcc}
for tool in apt-get apt-cache dpkg lz4 gzip readelf nm strings od "$cc"; do
    command -v "$tool" >/dev/null || die "'$tool' is missing (Debian packages: apt, dpkg, lz4, gzip, binutils, gcc)"
done

# The metapackage names the current kernel package.
kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ { print $2; exit }')
[ -n "$kpkg" ] || die "apt knows no linux-image-cloud-amd64 (run 'apt-get update' first)"
echo "linux guest: fetching $kpkg and busybox-static"
(cd "$work/debs" && apt-get download -q "$kpkg" busybox-static 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2) \
    || die "apt-get download $kpkg busybox-static failed"
for deb in "$work"/debs/*.deb; do
    dpkg -x "$deb" "$work/root"
done

kver=${kpkg#linux-image-}
cp "$work/root/boot/vmlinuz-$kver" "$out/bzImage"
cp "$work/root/boot/config-$kver" "$out/config"
cp "$work/root/boot/System.map-$kver" "$out/System.map"

# vmlinux: the protected-mode part of the bzImage starts after (setup_sects + 1) * 512 bytes; its
# compressed payload is at payload_offset (0x248) for payload_length (0x24c) bytes (boot protocol
# 2.08 and later). Debian builds it with LZ4 (legacy frame).
u8()  { od -An -tu1 -j "$2" -N 1 "$1" | tr -d ' '; }
u32() { od -An -tu4 -j "$2" -N 4 "$1" | tr -d ' '; }
setup_sects=$(u8 "$out/bzImage" $((0x1f1)))
[ "$setup_sects" -ne 0 ] || setup_sects=4
payload_offset=$(u32 "$out/bzImage" $((0x248)))
payload_length=$(u32 "$out/bzImage" $((0x24c)))
start=$(( (setup_sects + 1) * 512 + payload_offset ))
magic=$(od -An -tx1 -j "$start" -N 4 "$out/bzImage" | tr -d ' ')
[ "$magic" = "02214c18" ] || die "the kernel's payload is not LZ4 (magic $magic at byte $start); only LZ4 is handled"
tail -c +$((start + 1)) "$out/bzImage" | head -c "$payload_length" | lz4 -dc > "$out/vmlinux" 2>/dev/null || true
readelf -h "$out/vmlinux" >/dev/null 2>&1 || die "the decompressed payload is not an ELF file"
readelf -n "$out/vmlinux" | grep -q 'Xen' || die "vmlinux has no Xen ELF note (no PVH entry)"

# Modules are copied with their dependencies first (modinfo's depends= line), in load order.
moddir="$work/root/lib/modules/$kver/kernel"
# Usage: add_modules ROOT NAME...  (copies into ROOT/lib/modules and writes ROOT/lib/modules/order)
add_modules() {
    local root=$1; shift
    declare -gA seen=()
    order=()
    local m
    for m in "$@"; do
        add_module "$root" "$m"
    done
    printf '%s\n' "${order[@]}" > "$root/lib/modules/order"
}
add_module() {
    local root=$1 name=$2 file deps d
    [ -z "${seen[$name]:-}" ] || return 0
    seen[$name]=1
    # A module's file may spell its name with dashes (kvm-amd.ko is module kvm_amd).
    file=$(find "$moddir" \( -name "$name.ko" -o -name "${name//_/-}.ko" \) | head -n 1)
    [ -n "$file" ] || die "module $name is not in $kpkg"
    deps=$(strings -a "$file" | sed -n 's/^depends=//p' | head -n 1)
    for d in ${deps//,/ }; do
        add_module "$root" "$d"
    done
    cp "$file" "$root/lib/modules/"
    order+=("$(basename "$file" .ko)")
}
make_initramfs() {  # ROOT OUTPUT
    (cd "$1" && find . | sort | "$1/bin/busybox" cpio -o -H newc 2>/dev/null) | gzip -9 > "$2"
}
new_root() {  # ROOT INIT
    mkdir -p "$1"/{bin,dev,proc,sys,mnt,lib/modules}
    cp "$work/root/bin/busybox" "$1/bin/busybox"
    cp "$2" "$1/init"
    chmod 755 "$1/init" "$1/bin/busybox"
}

# iperf3 for the network benchmark (init's iperf check): Debian's binary with the libraries its
# ELF headers ask for, found by NEEDED in the unpacked packages (libc6's too, so the guest's
# glibc is Debian's, not the build machine's), and the dynamic loader at the path the binary names.
# libcrypto.so.3 serves only iperf3's authentication (RSA keys, --username), which the benchmark
# does not use; at 4.5 MiB it would have been most of the initramfs, so the guest gets a stub of
# that name instead: every OpenSSL function iperf3's libraries import (nm), each ending the
# program with a message (they are bound at load, BIND_NOW, so each must exist).
# Usage: add_iperf3 ROOT
iperf_debs=(iperf3 libiperf0 libsctp1 libc6)
add_iperf3() {
    local root=$1 src="$work/iperf3" libdir=lib/x86_64-linux-gnu interp queue lib found name stub=""
    mkdir -p "$src" "$work/iperf3-debs" "$root/$libdir" "$root/lib64"
    (cd "$work/iperf3-debs" && apt-get download -q "${iperf_debs[@]}" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2) \
        || die "apt-get download ${iperf_debs[*]} failed"
    for deb in "$work"/iperf3-debs/*.deb; do
        dpkg -x "$deb" "$src"
    done
    cp "$src/usr/bin/iperf3" "$root/bin/iperf3"
    interp=$(readelf -l "$src/usr/bin/iperf3" | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')
    [ "$interp" = /lib64/ld-linux-x86-64.so.2 ] || die "iperf3 asks for the loader '$interp'"
    cp -L "$src/$libdir/ld-linux-x86-64.so.2" "$root/$libdir/"
    ln -sf "/$libdir/ld-linux-x86-64.so.2" "$root/lib64/ld-linux-x86-64.so.2"
    declare -A copied=()
    queue=("$src/usr/bin/iperf3")
    while [ ${#queue[@]} -gt 0 ]; do
        for lib in $(readelf -d "${queue[0]}" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
            [ -z "${copied[$lib]:-}" ] || continue
            copied[$lib]=1
            if [ "$lib" = libcrypto.so.3 ]; then
                stub=$lib
                continue
            fi
            found=$(find "$src/$libdir" "$src/usr/$libdir" -name "$lib" 2>/dev/null | head -n 1)
            [ -n "$found" ] || die "iperf3 needs $lib, which none of ${iperf_debs[*]} holds"
            cp -L "$found" "$root/$libdir/$lib"
            queue+=("$found")
        done
        queue=("${queue[@]:1}")
    done
    if [ -n "$stub" ]; then
        local symbols
        symbols=$(nm -D --undefined-only "$src/usr/bin/iperf3" "$root/$libdir"/*.so* 2>/dev/null \
            | sed -n 's/^ *U \([A-Za-z0-9_]*\)@OPENSSL_3\.0\.0$/\1/p' | sort -u)
        [ -n "$symbols" ] || die "iperf3 needs libcrypto.so.3 but imports nothing from it"
        {
            echo '#include <stdio.h>'
            echo '#include <stdlib.h>'
            echo 'static void stub(const char *f) { fprintf(stderr, "iperf3: %s: no OpenSSL in this guest (a stub libcrypto)\n", f); exit(1); }'
            for f in $symbols; do echo "void $f(void) { stub(\"$f\"); }"; done
        } > "$work/crypto-stub.c"
        { echo 'OPENSSL_3.0.0 { global:'; printf '    %s;\n' $symbols; echo '  local: *; };'; } > "$work/crypto-stub.map"
        "$cc" -shared -fPIC -Os -s -Wall -o "$root/$libdir/$stub" -Wl,-soname,"$stub" \
            -Wl,--version-script="$work/crypto-stub.map" "$work/crypto-stub.c" || die "cannot build the stub $stub"
    fi
    name=$(chroot "$root" /bin/iperf3 --version 2>/dev/null | head -n 1) || name=""
    [ -n "$name" ] || [ "$(id -u)" -ne 0 ] || die "iperf3 does not run in the initramfs's root"
    echo "linux guest: ${name:-iperf3} with ${!copied[*]}${stub:+ ($stub a stub)}"
}

# The test guest's initramfs: busybox, the virtio modules, the init script, kvm-exit, which init
# uses to end a test run with its verdict (static), iperf3 with its libraries, and kvm-rr, linked
# against the glibc that iperf3 brings (a static kvm-rr would add 300 KiB compressed).
root="$work/initramfs"
new_root "$root" "$here/init"
"$cc" -static -Os -s -Wall -Wextra -Werror -std=gnu11 -o "$root/bin/kvm-exit" "$here/kvm-exit.c" \
    || die "cannot build kvm-exit (a static build needs libc6-dev)"
add_iperf3 "$root"
"$cc" -Os -s -Wall -Wextra -Werror -std=gnu11 -o "$root/bin/kvm-rr" "$here/kvm-rr.c" || die "cannot build kvm-rr"
if [ "$(id -u)" -eq 0 ]; then
    case "$(chroot "$root" /bin/kvm-rr 2>&1)" in
        usage:*) ;;
        *) die "kvm-rr does not run in the initramfs's root" ;;
    esac
fi
cp "$root/bin/kvm-rr" "$out/kvm-rr"
"$cc" -Os -s -Wall -Wextra -Werror -std=gnu11 -o "$root/bin/kvm-flood" "$here/kvm-flood.c" || die "cannot build kvm-flood"
add_modules "$root" virtio_pci virtio_blk virtio_net
guest_modules=("${order[@]}")
make_initramfs "$root" "$out/initramfs.cpio.gz"

# The nested KVM host's initramfs (tests/kvm-host): KVM for AMD SVM (QEMU's TCG emulates it),
# virtiofs for the host's files, a virtio disk for scratch space, and the network modules later
# tests load (tun, veth, bridge, VLANs, bonding, macvtap, vhost-net, qdiscs).
root="$work/kvm-host"
new_root "$root" "$here/kvm-host-init"
"$cc" -static -Os -s -Wall -Wextra -Werror -std=gnu11 -o "$root/bin/kvm-hold" "$here/kvm-hold.c" \
    || die "cannot build kvm-hold (a static build needs libc6-dev and linux-libc-dev)"
add_modules "$root" kvm_amd virtiofs virtio_pci virtio_blk overlay \
    tun veth bridge 8021q bonding macvtap vhost_net sch_tbf sch_htb sch_netem act_police
make_initramfs "$root" "$out/kvm-host.cpio.gz"

rm -rf "$work"
echo "linux guest: $out/bzImage, $out/vmlinux ($(stat -c %s "$out/vmlinux") bytes), $out/initramfs.cpio.gz (modules: ${guest_modules[*]})"
echo "linux guest: $out/kvm-host.cpio.gz for the nested KVM host (modules: ${order[*]})"
