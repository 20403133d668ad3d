#!/usr/bin/env bash
# Installs what vmlet needs on a Debian 12 host. Idempotent: does nothing when
# everything is already present. Run as root.
#
#   qemu-system-x86 10.x  from bookworm-backports (added as an apt source if absent)
#   qemu-utils            qemu-img
#   swtpm                 the TPM emulator behind VMs with a vTPM (spec `tpm`)
#   iproute2              ip, bridge (used by tests and operators)
#   novnc                 the noVNC files vmlet serves with its console page
#                         (/usr/share/novnc, setting console.novnc_dir)
#   ovmf                  UEFI firmware (boot.firmware uefi, uefi-secure),
#                         found through /usr/share/qemu/firmware/*.json
#   gzip, libglib2.0-0, libnuma1, liburing2, libudev1
#                         what scripts/build-test-guest.sh needs for the test
#                         guest (README's "Try it" builds it)
# With --test, also what the test suite needs: procps, and
# syslinux, mtools and dosfstools (a BIOS-bootable disk for the firmware-boot
# test), iputils-ping (the network tests ping guests from a namespace), and
# for the console's browser test chromium (Debian's, /usr/bin/chromium),
# nodejs and npm when node or npm is missing, and playwright-core (npm ci in
# tests/browser, from its package-lock.json; it drives that chromium and
# never downloads a browser of its own), python3-venv when python3 cannot
# make a venv, and schemathesis (pinned, from PyPI, in a venv at
# TARGET/schemathesis-venv, TARGET being $CARGO_TARGET_DIR or target/) for
# the OpenAPI conformance test (tests/openapi_conformance.rs).
# The test guest's busybox, qemu-guest-agent and kernel are downloaded by
# build-test-guest.sh with apt-get download, not installed; so are the Secure
# Boot tests' shim-signed and grub-efi-amd64-signed (fetch-signed-boot.sh),
# for which --test makes sure apt's package lists know them.
# With --test, also e2fsprogs (tests/guest_agent.rs makes an ext4 for the
# guest to freeze and checks the snapshot's copy of it).
set -euo pipefail

want_test_tools=0
[ "${1:-}" = "--test" ] && want_test_tools=1

log() { echo "setup: $*" >&2; }

qemu_major() {
    command -v qemu-system-x86_64 >/dev/null 2>&1 || { echo 0; return; }
    qemu-system-x86_64 --version | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p'
}

missing=()
[ "$(qemu_major)" -ge 10 ] 2>/dev/null || missing+=(qemu-system-x86)
command -v qemu-img >/dev/null 2>&1 || missing+=(qemu-utils)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v swtpm >/dev/null 2>&1 || missing+=(swtpm)
[ -f /usr/share/novnc/core/rfb.js ] || missing+=(novnc)
dpkg -s ovmf >/dev/null 2>&1 || missing+=(ovmf)
# The test guest (scripts/build-test-guest.sh, which README's "Try it"
# runs): gzip for its initramfs, and its qemu-ga (downloaded, not installed)
# runs on the host's copies of its shared libraries (the script copies them in).
command -v gzip >/dev/null 2>&1 || missing+=(gzip)
for pair in libglib-2.0.so.0:libglib2.0-0 libnuma.so.1:libnuma1 liburing.so.2:liburing2 libudev.so.1:libudev1; do
    ldconfig -p | grep -q "^[[:space:]]*${pair%%:*} " || missing+=("${pair#*:}")
done
if [ "$want_test_tools" = 1 ]; then
    # command -> package, for the test suite only.
    for pair in pgrep:procps mkfs.vfat:dosfstools mcopy:mtools syslinux:syslinux ping:iputils-ping; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
    done
    # syslinux's BIOS boot files (ldlinux.c32) for the firmware-boot test disk.
    dpkg -s syslinux-common >/dev/null 2>&1 || missing+=(syslinux-common)
    # The console's browser test (tests/console_browser.rs).
    for pair in chromium:chromium node:nodejs npm:npm; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
    done
    # The quiesced-snapshot test's ext4 (mkfs.ext4, dumpe2fs, debugfs, e2fsck).
    PATH=$PATH:/usr/sbin:/sbin command -v mkfs.ext4 >/dev/null 2>&1 || missing+=(e2fsprogs)
    # The OpenAPI conformance test's schemathesis lives in a venv.
    python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
fi

root_dir=$(cd "$(dirname "$0")/.." && pwd)
browser_dir=$root_dir/tests/browser

# The schemathesis the conformance test runs; bump deliberately (a new
# version brings new checks).
SCHEMATHESIS_VERSION=4.32.5
schemathesis_venv=${CARGO_TARGET_DIR:-$root_dir/target}/schemathesis-venv

# A venv with schemathesis==SCHEMATHESIS_VERSION, unless it is there already.
install_schemathesis() {
    local bin=$schemathesis_venv/bin/schemathesis
    if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -qx "schemathesis, version $SCHEMATHESIS_VERSION"; then
        return 0
    fi
    log "installing schemathesis $SCHEMATHESIS_VERSION into $schemathesis_venv"
    rm -rf "$schemathesis_venv"
    mkdir -p "$(dirname "$schemathesis_venv")"
    python3 -m venv "$schemathesis_venv"
    "$schemathesis_venv/bin/pip" install --quiet --disable-pip-version-check \
        "schemathesis==$SCHEMATHESIS_VERSION"
}

# npm ci in tests/browser, unless node_modules already matches the lock file
# (npm ci leaves its own copy of the lock in there).
install_browser_driver() {
    local lock=$browser_dir/package-lock.json installed=$browser_dir/node_modules/.package-lock.json
    if [ -f "$installed" ] && [ ! "$lock" -nt "$installed" ] &&
        [ -f "$browser_dir/node_modules/playwright-core/package.json" ]; then
        return 0
    fi
    log "npm ci in tests/browser (playwright-core)"
    (cd "$browser_dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    local major
    major=$(node --version | sed -n 's/^v\([0-9]*\)\..*/\1/p')
    [ "${major:-0}" -ge 20 ] ||
        log "warning: node $(node --version) is older than playwright-core's minimum (20)"
}

# QEMU runs under a uid of its own (no capabilities), so it reaches /dev/kvm
# through the device's group, as udev sets it up on most hosts (0660
# root:kvm). Without udev the node may be root's alone: give it that group.
prepare_kvm_access() {
    [ "$(id -u)" = 0 ] && [ -c /dev/kvm ] || return 0
    getent group kvm >/dev/null || groupadd --system kvm
    if [ "$(stat -c %G /dev/kvm)" = root ]; then
        log "giving /dev/kvm to group kvm (mode 0660), so unprivileged QEMUs can use KVM"
        chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
    fi
}
prepare_kvm_access

if ! command -v cargo >/dev/null 2>&1; then
    # Debian 12's own Rust (1.63) is too old for vmlet's dependencies.
    log "cargo not found: install a current Rust toolchain (https://rustup.rs) first"
    exit 1
fi

# Downloaded, never installed (the host's boot setup is left alone), but
# apt must know them.
if [ "$want_test_tools" = 1 ] && [ "$(id -u)" = 0 ] &&
    ! apt-cache show --no-all-versions shim-signed grub-efi-amd64-signed >/dev/null 2>&1; then
    log "apt's lists lack shim-signed or grub-efi-amd64-signed: running apt-get update"
    apt-get update -qq
fi

if [ ${#missing[@]} -eq 0 ]; then
    [ "$want_test_tools" = 0 ] || { install_browser_driver; install_schemathesis; }
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    log "missing packages (${missing[*]}) and not root: install them or rerun as root"
    exit 1
fi

# bookworm-backports carries QEMU 10; Debian 12's own is 7.2.
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    log "adding bookworm-backports apt source"
    uri=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | grep -v security | head -n1)
    [ -n "$uri" ] || uri=http://deb.debian.org/debian
    cat > /etc/apt/sources.list.d/bookworm-backports.sources <<SRC
Types: deb
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

log "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# -t lets QEMU's own dependencies (seabios, qemu-system-data, …) come from
# backports too; packages that are not in backports still come from bookworm.
apt-get install -y -qq --no-install-recommends -t bookworm-backports "${missing[@]}" >/dev/null
[ "$want_test_tools" = 0 ] || { install_browser_driver; install_schemathesis; }
log "done: $(qemu-system-x86_64 --version | head -n1)"
