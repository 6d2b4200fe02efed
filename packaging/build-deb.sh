#!/bin/bash
# Builds the Debian package kvm from the published programs (make deb runs this after make programs):
#   packaging/build-deb.sh [LIBDIR [OUTDIR]]   (defaults build/lib and build)
# writes OUTDIR/kvm_VERSION_amd64.deb, VERSION being the file VERSION, and prints its path.
#
# Layout: the NativeAOT programs and libkvmshim.so in /usr/lib/kvm (each program finds the shim and
# the others beside its real path, /proc/self/exe), symlinks /usr/sbin/kvmd and /usr/bin/vmctl,
# the unit in /lib/systemd/system (Debian 12 keeps units there: lintian's
# systemd-service-file-outside-lib), /run/kvm through tmpfiles.d, /var/lib/kvm, /etc/default/kvmd,
# manual pages made from the programs' --help (help2man), and the maintainer scripts beside this
# file. No debhelper: the package is binary-only and these few steps are all it needs.
# Needs dpkg-dev (dpkg-shlibdeps), binutils (strip), help2man.
set -euo pipefail
cd "$(dirname "$0")/.."
libdir=$(realpath "${1:-build/lib}")
outdir=$(realpath "${2:-build}")
version=$(tr -d '[:space:]' < VERSION)
arch=amd64   # make programs publishes for linux-x64
maintainer="${DEBFULLNAME:-kvm maintainers} <${DEBEMAIL:-maintainers@kvm.example.org}>"

die() { echo "build-deb: $*" >&2; exit 1; }
[[ $version =~ ^[0-9][A-Za-z0-9.+~]*$ ]] || die "VERSION '$version' is not a Debian upstream version"
for f in kvmd kvm-vmm vmctl libkvmshim.so; do
    [ -f "$libdir/$f" ] || die "$libdir/$f is missing (run 'make programs' first)"
done
for tool in dpkg-deb dpkg-shlibdeps strip help2man; do
    command -v "$tool" >/dev/null || die "$tool is not installed (Debian packages dpkg-dev, binutils, help2man)"
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/root"
# Reproducible: every file's time and the changelog's date are the last commit's.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)

install -d -m 0755 "$root/DEBIAN" "$root/usr/lib/kvm" "$root/usr/sbin" "$root/usr/bin" \
    "$root/lib/systemd/system" "$root/usr/lib/tmpfiles.d" "$root/etc/default" "$root/var/lib/kvm" \
    "$root/usr/share/doc/kvm" "$root/usr/share/man/man1" "$root/usr/share/man/man8"

# Programs, stripped as dh_strip does (NativeAOT already moved their symbols to NAME.dbg, which
# stays out of the package); the shim was built with -g.
for p in kvmd kvm-vmm vmctl; do
    install -m 0755 "$libdir/$p" "$root/usr/lib/kvm/$p"
    strip --remove-section=.comment --remove-section=.note "$root/usr/lib/kvm/$p"
done
install -m 0644 "$libdir/libkvmshim.so" "$root/usr/lib/kvm/libkvmshim.so"
strip --remove-section=.comment --remove-section=.note --strip-unneeded "$root/usr/lib/kvm/libkvmshim.so"
ln -s ../lib/kvm/kvmd "$root/usr/sbin/kvmd"
ln -s ../lib/kvm/vmctl "$root/usr/bin/vmctl"
# kvm-vmm stays out of PATH: kvmd and 'vmctl run' start it from beside themselves.

install -m 0644 systemd/kvmd.service "$root/lib/systemd/system/kvmd.service"
install -m 0644 packaging/kvm.tmpfiles "$root/usr/lib/tmpfiles.d/kvm.conf"
install -m 0644 packaging/kvmd.default "$root/etc/default/kvmd"

# Manual pages from --help, so that they say what the programs say.
help2man --no-info --no-discard-stderr --section=8 --version-string="$version" \
    --name="the kvm host daemon" "$root/usr/lib/kvm/kvmd" > "$work/kvmd.8"
help2man --no-info --no-discard-stderr --section=1 --version-string="$version" \
    --name="run and manage virtual machines on KVM" "$root/usr/lib/kvm/vmctl" > "$work/vmctl.1"
gzip -9n < "$work/kvmd.8" > "$root/usr/share/man/man8/kvmd.8.gz"
gzip -9n < "$work/vmctl.1" > "$root/usr/share/man/man1/vmctl.1.gz"

install -m 0644 packaging/copyright "$root/usr/share/doc/kvm/copyright"
install -m 0644 README.md "$root/usr/share/doc/kvm/README.md"
install -D -m 0644 packaging/lintian-overrides "$root/usr/share/lintian/overrides/kvm"
# Native version (no Debian revision): the package is made here, from this tree, so its
# changelog is changelog.gz (Policy 12.7), one entry per build.
cat > "$work/changelog" <<CHANGELOG
kvm ($version) unstable; urgency=medium

  * Built from commit $commit.

 -- $maintainer  $(date -u -R -d "@$SOURCE_DATE_EPOCH")
CHANGELOG
gzip -9n < "$work/changelog" > "$root/usr/share/doc/kvm/changelog.gz"

install -m 0755 packaging/postinst packaging/prerm packaging/postrm "$root/DEBIAN/"
echo /etc/default/kvmd > "$root/DEBIAN/conffiles"
(cd "$root" && find . -type f ! -path './DEBIAN/*' ! -path './etc/*' -printf '%P\0' | LC_ALL=C sort -z |
    xargs -0 md5sum) > "$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/conffiles" "$root/DEBIAN/md5sums"

# Depends: the shared libraries the programs link (libc6), as dpkg-shlibdeps finds them; it
# wants a debian/control to read, so it gets a minimal one. adduser: postinst's addgroup.
mkdir -p "$work/src/debian"
printf 'Source: kvm\n\nPackage: kvm\nArchitecture: %s\n' "$arch" > "$work/src/debian/control"
shlibs=$(cd "$work/src" && dpkg-shlibdeps -O -e"$root/usr/lib/kvm/kvmd" -e"$root/usr/lib/kvm/kvm-vmm" \
    -e"$root/usr/lib/kvm/vmctl" -e"$root/usr/lib/kvm/libkvmshim.so" 2>"$work/shlibdeps.log" |
    sed -n 's/^shlibs:Depends=//p') || { cat "$work/shlibdeps.log" >&2; die "dpkg-shlibdeps failed"; }
[ -n "$shlibs" ] || die "dpkg-shlibdeps found no library dependencies"

cat > "$root/DEBIAN/control" <<CONTROL
Package: kvm
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $(du -sk --exclude=DEBIAN "$root" | cut -f1)
Depends: $shlibs, adduser
Recommends: postgresql
Suggests: libssl3
Section: admin
Priority: optional
Description: virtual machine monitor for Linux KVM, written in C#
 Runs virtual machines on /dev/kvm, one kvm-vmm process per VM, published
 ahead of time as native programs (no .NET runtime needed). VMs boot Linux
 (bzImage or PVH) and have virtio-blk disks on raw images or a qcow2-compatible
 copy-on-write format with backing chains.
 .
 kvmd, the host daemon (kvmd.service), keeps the VM inventory and leases in
 PostgreSQL (a private cluster under /var/lib/kvm, run by the installed
 PostgreSQL server programs, or a shared one) and supervises the VMs; they
 keep running when kvmd restarts. vmctl is the command line; 'vmctl run' boots
 a VM in the foreground without the daemon. libssl3 is needed only for TLS
 connections to a shared PostgreSQL server.
CONTROL

find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
out="$outdir/kvm_${version}_${arch}.deb"
mkdir -p "$outdir"
dpkg-deb --root-owner-group -Zxz --build "$root" "$out.tmp" >/dev/null
mv "$out.tmp" "$out"
echo "$out"
