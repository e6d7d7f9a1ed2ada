#!/usr/bin/env bash
# Installs what the hardware lab (make hwlab, pcipt/devcluster/hwlab.py) needs, when missing:
#   qemu-system-x86 (>= 8.0, for the igb SR-IOV NIC) from bookworm-backports: Debian 12 ships
#       7.2; the backports upgrade touches only the qemu and seabios packages
#   linux-image-amd64                 the lab hosts' kernel (Debian's 6.1, with its modules)
#   busybox-static                    the lab's initramfs
#   nvme-cli                          NVMe SR-IOV flexible resources (nvme virt-mgmt) inside
#   pciutils                          lspci inside, to compare discovery with
# Debian/Ubuntu with apt-get, as root.
set -euo pipefail

qemu_ok() {
  command -v qemu-system-x86_64 >/dev/null 2>&1 \
    && qemu-system-x86_64 -device help 2>/dev/null | grep -q '"igb"'
}
need=()
qemu_ok || need+=(qemu-system-x86)
ls /boot/vmlinuz-* >/dev/null 2>&1 || need+=(linux-image-amd64)
# The initramfs has no C library: the statically linked busybox, not Debian's plain one.
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "install ok installed" \
  || need+=(busybox-static)
command -v nvme >/dev/null 2>&1 || need+=(nvme-cli)
command -v lspci >/dev/null 2>&1 || need+=(pciutils)
[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ]; then
  echo "install-hwlab-deps: missing ${need[*]}; run this script as root" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
. /etc/os-release
backports=/etc/apt/sources.list.d/pcipt-backports.sources
if [ "${VERSION_CODENAME:-}" = bookworm ] && [ ! -e "$backports" ]; then
  cat >"$backports" <<SOURCES
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
fi
echo "install-hwlab-deps: installing ${need[*]}" >&2
apt-get update -qq
rest=()
for p in "${need[@]}"; do
  if [ "$p" = qemu-system-x86 ] && [ "${VERSION_CODENAME:-}" = bookworm ]; then
    # Its own dependencies (qemu-system-common, -data, seabios) must come from there too.
    apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 >/dev/null
  else
    rest+=("$p")
  fi
done
[ ${#rest[@]} -eq 0 ] || apt-get install -y -qq --no-install-recommends "${rest[@]}" >/dev/null
qemu_ok || { echo "install-hwlab-deps: QEMU still has no igb device" >&2; exit 1; }
