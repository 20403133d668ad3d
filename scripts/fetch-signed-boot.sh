#!/usr/bin/env bash
# Fetches Debian's signed UEFI boot chain for vmlet's Secure Boot tests:
# shim (signed by Microsoft's UEFI CA, which the Secure Boot firmware's
# variable template enrols) and the monolithic GRUB (signed by Debian, whose
# key shim carries). With the test guest's kernel (signed by Debian) they
# make a disk that boots under Secure Boot (tests/common/esp.rs builds it).
#
#   scripts/fetch-signed-boot.sh            # prints the output directory (last line of stdout)
#   TARGET_DIR=/some/target scripts/fetch-signed-boot.sh
#
# Nothing is installed on the host and the host's boot setup is not touched:
# the packages are fetched with `apt-get download` and unpacked with
# `dpkg-deb -x` into a scratch directory.
#
# Output: $TARGET_DIR/signed-boot/<shim-signed version>_<grub-efi-amd64-signed version>/
#   shimx64.efi    from shim-signed (/usr/lib/shim/shimx64.efi.signed)
#   grubx64.efi    from grub-efi-amd64-signed (/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed)
#   versions.env   KEY=value lines naming the package versions
# A directory is only ever created by an atomic rename of a finished fetch;
# it is reused as is when present. Concurrent runs serialise on
# $TARGET_DIR/signed-boot/fetch.lock.
#
# Progress goes to stderr; stdout carries only the output directory.
set -Eeuo pipefail
trap 'echo "fetch-signed-boot: error: line $LINENO: $BASH_COMMAND failed" >&2' ERR

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${TARGET_DIR:-$REPO/target}
SHIM_PKG=shim-signed
GRUB_PKG=grub-efi-amd64-signed

log() { echo "fetch-signed-boot: $*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in apt-cache apt-get dpkg-deb flock; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found (run scripts/setup.sh --test)"
done

base=$TARGET_DIR/signed-boot
mkdir -p "$base"
exec 9>"$base/fetch.lock"
flock 9

# The candidate versions apt would install (empty when it does not know them).
resolve() { # sets shimver grubver
    local info
    info=$(apt-cache show --no-all-versions "$SHIM_PKG" "$GRUB_PKG" 2>/dev/null || true)
    shimver=$(printf '%s\n' "$info" | sed -n "/^Package: $SHIM_PKG\$/,/^\$/s/^Version: //p")
    shimver=${shimver%%$'\n'*}
    grubver=$(printf '%s\n' "$info" | sed -n "/^Package: $GRUB_PKG\$/,/^\$/s/^Version: //p")
    grubver=${grubver%%$'\n'*}
}

resolve
if [ -z "$shimver" ] || [ -z "$grubver" ]; then
    [ "$(id -u)" = 0 ] || die "apt does not know $SHIM_PKG and $GRUB_PKG and not root: run 'apt-get update' as root"
    log "running apt-get update"
    apt-get update -qq >&2 || die "apt-get update failed"
    resolve
    [ -n "$shimver" ] && [ -n "$grubver" ] || die "apt-cache knows no $SHIM_PKG or $GRUB_PKG"
fi
# Versions may hold ':' and '~' (valid in a file name) but never '/'.
out=$base/${shimver}_${grubver}
if [ -f "$out/shimx64.efi" ] && [ -f "$out/grubx64.efi" ] && [ -f "$out/versions.env" ]; then
    echo "$out"
    exit 0
fi

rm -rf "$base"/.tmp.*
stage=$(mktemp -d "$base/.tmp.XXXXXX")
trap 'rm -rf "$stage"' EXIT
# apt-get download drops to user _apt and writes into the current directory.
mkdir -p "$stage/debs"
chmod 0777 "$stage/debs"
chmod 0755 "$stage"
(cd "$stage/debs" && apt-get download -qq "$SHIM_PKG=$shimver" "$GRUB_PKG=$grubver" >&2) ||
    die "apt-get download $SHIM_PKG=$shimver $GRUB_PKG=$grubver failed (stale apt lists? run 'apt-get update')"
for deb in "$stage"/debs/*.deb; do
    dpkg-deb -x "$deb" "$stage/x"
done
shim=$stage/x/usr/lib/shim/shimx64.efi.signed
grub=$stage/x/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed
[ -f "$shim" ] || die "no shimx64.efi.signed in $SHIM_PKG $shimver"
[ -f "$grub" ] || die "no grubx64.efi.signed in $GRUB_PKG $grubver"
mkdir "$stage/out"
cp "$shim" "$stage/out/shimx64.efi"
cp "$grub" "$stage/out/grubx64.efi"
printf 'SHIM_SIGNED_VERSION=%s\nGRUB_EFI_AMD64_SIGNED_VERSION=%s\n' "$shimver" "$grubver" \
    >"$stage/out/versions.env"
mv -T "$stage/out" "$out"
log "fetched $SHIM_PKG $shimver and $GRUB_PKG $grubver"
echo "$out"
