#!/usr/bin/env bash
# Installs the system packages pcipt's build, tests and demo need, when any is missing.
# Debian/Ubuntu (apt-get); as root or through sudo. Prints what to install otherwise.
#   libvirt-dev, pkg-config, gcc, python3-dev  build libvirt-python
#   libvirt-clients                            virt-xml-validate (libvirt's own schema check)
#   libvirt-daemon / libvirt0                  the libvirt library with its test:/// driver
#   pciutils, pci.ids                          lspci for the /sys smoke test; device names
#   buildah, debootstrap                       the container image test: a Debian base made
#                                              locally, the Containerfile built without a daemon
#   containerd, runc, containernetworking-plugins, conntrack, iptables
#                                              the local node whose pods really run
#                                              (pcipt/devcluster/node.py)
#   libvirt-daemon                             libvirtd on that node, serving the test driver
#                                              to the node plugin's pod (it pulls in
#                                              libvirt-daemon-driver-qemu, whose module the
#                                              node hides: no QEMU runs there)
set -euo pipefail

need=()
have_cmd() { command -v "$1" >/dev/null 2>&1; }
have_pkgconfig_libvirt() { have_cmd pkg-config && pkg-config --exists libvirt; }

have_cmd gcc || need+=(gcc)
have_cmd pkg-config || need+=(pkg-config)
have_pkgconfig_libvirt || need+=(libvirt-dev)
have_cmd virt-xml-validate || need+=(libvirt-clients)
have_cmd lspci || need+=(pciutils)
[ -e /usr/share/misc/pci.ids ] || [ -e /usr/share/hwdata/pci.ids ] || need+=(pci.ids)
have_cmd xmllint || need+=(libxml2-utils)
have_cmd git || need+=(git)
have_cmd make || need+=(make)
have_cmd buildah || need+=(buildah)
have_cmd debootstrap || need+=(debootstrap)
have_cmd containerd || need+=(containerd)
have_cmd runc || need+=(runc)
have_cmd conntrack || need+=(conntrack)
have_cmd iptables || need+=(iptables)
[ -x /usr/lib/cni/bridge ] || [ -x /opt/cni/bin/bridge ] || need+=(containernetworking-plugins)
have_cmd libvirtd || need+=(libvirt-daemon)
have_cmd nsenter || need+=(util-linux)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi

echo "install-system-deps: installing ${need[*]}" >&2
if [ "$(id -u)" = 0 ]; then
  sudo=()
elif have_cmd sudo && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "install-system-deps: missing ${need[*]}; install them with: sudo apt-get install ${need[*]}" >&2
  exit 1
fi
if ! have_cmd apt-get; then
  echo "install-system-deps: no apt-get here; install the equivalents of: ${need[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
