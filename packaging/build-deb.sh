#!/bin/bash
# Builds a Debian package from build/ (run 'make' first): programs in /usr/lib/kvm, launchers in
# /usr/bin, the guest kit in /usr/share/kvm, the kvmd unit in /lib/systemd/system.
# Usage: packaging/build-deb.sh [VERSION]   -> build/kvm_VERSION_amd64.deb
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-0.1.0}"
build="$PWD/build"
for f in "$build/lib/vmctl" "$build/lib/kvm-vmm" "$build/lib/kvmd" "$build/guest/guestkit.elf"; do
  [ -e "$f" ] || { echo "build-deb: $f is missing (run 'make' first)" >&2; exit 1; }
done

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
install -d "$root/DEBIAN" "$root/usr/lib/kvm" "$root/usr/bin" "$root/usr/share/kvm" \
  "$root/lib/systemd/system" "$root/usr/share/doc/kvm"
cp -a "$build/lib/." "$root/usr/lib/kvm/"
rm -f "$root/usr/lib/kvm/.published" "$root"/usr/lib/kvm/*.pdb "$root"/usr/lib/kvm/*.dbg
# The programs are NativeAOT executables: they find libkvmshim.so beside their real path, so
# /usr/bin holds plain symlinks.
for p in vmctl kvm-vmm kvmd; do
  ln -s "../lib/kvm/$p" "$root/usr/bin/$p"
done
install -m 0644 "$build/guest/guestkit.elf" "$root/usr/share/kvm/guestkit.elf"
install -m 0644 systemd/kvmd.service "$root/lib/systemd/system/kvmd.service"
install -m 0644 README.md "$root/usr/share/doc/kvm/README.md"

cat > "$root/DEBIAN/control" <<CONTROL
Package: kvm-vmm
Version: $version
Architecture: amd64
Maintainer: kvm maintainers <maintainers@example.invalid>
Depends: libc6
Recommends: qemu-utils
Section: admin
Priority: optional
Description: virtual machine monitor for Linux KVM, written in C#
 vmctl runs VMs on /dev/kvm; kvm-vmm runs one VM per process; kvmd is the host daemon.
CONTROL

out="$build/kvm_${version}_amd64.deb"
dpkg-deb --root-owner-group --build "$root" "$out" >/dev/null
echo "$out"
