#!/usr/bin/env bash
# Build the pcipt image from the Containerfile with buildah: no daemon, no registry. The base
# is Debian bookworm made here with debootstrap (cached as a tarball), since a registry may be
# out of reach; pass BASE=<image> to build on another base instead.
#
#   hack/build-image.sh [tag]          default tag: localhost/pcipt:dev
#
# Storage is buildah's vfs driver in a private folder (PCIPT_IMAGE_ROOT, default
# ~/.cache/pcipt/image/storage), with chroot isolation: it works inside containers and CI
# machines without overlayfs or user namespaces. Run buildah with the same --root to use the
# image (hack/build-image.sh prints the flags). Needs root, buildah and debootstrap.
set -euo pipefail

tag=${1:-localhost/pcipt:dev}
cache=${PCIPT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/pcipt}/image
root=${PCIPT_IMAGE_ROOT:-$cache/storage}
runroot=${PCIPT_IMAGE_RUNROOT:-$cache/run}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
base=${BASE:-localhost/pcipt-base:bookworm}
storage=(--storage-driver vfs --root "$root" --runroot "$runroot")
repo=$(cd "$(dirname "$0")/.." && pwd)

mkdir -p "$cache"
if [ "$base" = localhost/pcipt-base:bookworm ] \
  && ! buildah "${storage[@]}" inspect --type image "$base" >/dev/null 2>&1; then
  tarball=$cache/bookworm-minbase.tar
  if [ ! -s "$tarball" ]; then
    rootfs=$(mktemp -d "$cache/rootfs.XXXXXX")
    trap 'rm -rf "$rootfs"' EXIT
    echo "build-image: debootstrap bookworm (minbase) from $mirror" >&2
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1 \
      || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf "$rootfs"
    trap - EXIT
  fi
  ctr=$(buildah "${storage[@]}" from scratch)
  buildah "${storage[@]}" add "$ctr" "$tarball" / >/dev/null
  buildah "${storage[@]}" config --cmd /bin/bash "$ctr"
  buildah "${storage[@]}" commit --rm -q "$ctr" "$base" >/dev/null
  echo "build-image: base $base made" >&2
fi

# pip inside the build trusts what this machine trusts (a TLS-inspecting proxy's CA, say):
# the bundle is mounted for the build only, never copied into the image.
extra=()
ca=/etc/ssl/certs/ca-certificates.crt
if [ -s "$ca" ]; then
  extra+=(--volume "$ca:/run/host-ca.crt:ro" --build-arg PIP_CERT=/run/host-ca.crt)
fi
buildah "${storage[@]}" bud --isolation chroot --layers=false -q \
  --build-arg "BASE=$base" "${extra[@]}" -t "$tag" -f "$repo/Containerfile" "$repo" >/dev/null
# vfs keeps a full copy per image: drop the one this tag pointed to before.
buildah "${storage[@]}" images -q --filter dangling=true | xargs -r buildah "${storage[@]}" rmi -f >/dev/null
size=$(buildah "${storage[@]}" images --format '{{.Size}}' "$tag" | head -1)
echo "build-image: $tag built ($size); use it with: buildah ${storage[*]} ..." >&2
