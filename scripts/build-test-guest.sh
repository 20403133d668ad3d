#!/usr/bin/env bash
# Builds the test guest used by vmlet's integration tests: a Debian cloud kernel
# plus a busybox initramfs whose /init (scripts/test-guest/init) reports what
# the guest sees ("GUEST-READY ...") and acts on guest.* kernel parameters.
#
#   scripts/build-test-guest.sh            # prints the output directory (last line of stdout)
#   TARGET_DIR=/some/target scripts/build-test-guest.sh
#
# Everything comes from Debian packages (linux-image-cloud-amd64 resolved to
# the real ABI package, busybox-static, qemu-guest-agent); no kmod or cpio
# needed on the host. qemu-ga is dynamically linked: its shared libraries (and
# the dynamic loader) are the host's, as ldd resolves them for the extracted
# binary, copied to the same paths in the guest (host and guest are both
# Debian 12 x86-64; scripts/setup.sh installs them).
#
# Output: $TARGET_DIR/test-guest/<kernel-release>_<kernel-pkg-version>-<inputs-hash>/
#   vmlinuz      the kernel
#   initrd.img   gzip'd newc cpio: busybox, /init, modules
#   guest.env    KEY=value lines naming the versions and modules that went in
# The hash covers /init, this script and the busybox and qemu-guest-agent
# versions, so editing the
# init script gives a new directory instead of a stale cached guest. A directory
# is only ever created by an atomic rename of a finished build; it is reused as
# is when present. Concurrent runs serialise on $TARGET_DIR/test-guest/build.lock
# (not test-guest.lock: the Rust helper holds that one while running us, and a
# second flock on it from this process would deadlock).
#
# Progress goes to stderr; stdout carries only the output directory.
set -Eeuo pipefail
trap 'echo "build-test-guest: error: line $LINENO: $BASH_COMMAND failed" >&2' ERR

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${TARGET_DIR:-$REPO/target}
INIT_SRC=$REPO/scripts/test-guest/init
KERNEL_META=linux-image-cloud-amd64

# Modules the guest loads, in a sensible order (transports first, then device
# drivers; SCSI upper drivers before virtio_scsi so its scan finds them).
# Dependencies are added automatically from each .ko's depends= and always
# land before their users; built-in ones (modules.builtin) are skipped.
#   button, evdev: ACPI power button -> /dev/input/event* for busybox acpid.
#   pvpanic-mmio: drives QEMU's ISA pvpanic (ACPI QEMU0001, an I/O port despite
#     the name), so a guest panic reaches QEMU (GUEST_PANICKED); pulls in pvpanic.
WANTED_MODULES=(
    virtio_pci virtio_mmio
    virtio_blk virtio_net virtio_console virtio-rng virtio_balloon
    vmw_vsock_virtio_transport
    sd_mod sr_mod virtio_scsi
    vfat nls_cp437 nls_iso8859-1 nls_utf8 isofs
    evdev button
    pvpanic-mmio
)

# Modules put in /lib/modules but not in load-order: /init loads them when a
# guest.* parameter asks (efivarfs: guest.efivar). They keep Debian's
# signature, so that a guest booted with EFI Secure Boot, whose kernel then
# refuses unsigned modules (lockdown), can load them. Each must have no
# dependencies that are modules.
SIGNED_ON_DEMAND_MODULES=(efivarfs)

log() { echo "build-test-guest: $*" >&2; }
die() { log "error: $*"; exit 1; }

[ -f "$INIT_SRC" ] || die "missing $INIT_SRC"
for tool in apt-cache apt-get dpkg-deb sha256sum gzip flock; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found (run scripts/setup.sh --test)"
done

# One apt-cache run (about 1 s when apt keeps no binary cache) gives the
# metapackage's candidate, whose Depends names the real kernel package and
# its exact version, plus busybox-static's candidate version.
resolve_packages() { # sets kpkg kver bbver (empty when apt does not know them)
    local info
    info=$(apt-cache show --no-all-versions "$KERNEL_META" busybox-static qemu-guest-agent 2>/dev/null || true)
    # (First lines taken with ${x%%$'\n'*}, not head: a reader that quits
    # early can SIGPIPE the writer, which pipefail turns into a failure.)
    kpkg=$(printf '%s\n' "$info" |
        sed -n 's/^Depends:.*\(linux-image-[0-9][^ ,]*\).*/\1/p')
    kpkg=${kpkg%%$'\n'*}
    kver=$(printf '%s\n' "$info" |
        sed -n "s/^Depends:.*$kpkg (= \([^)]*\)).*/\1/p")
    kver=${kver%%$'\n'*}
    bbver=$(printf '%s\n' "$info" |
        sed -n '/^Package: busybox-static$/,/^$/s/^Version: //p')
    bbver=${bbver%%$'\n'*}
    qgaver=$(printf '%s\n' "$info" |
        sed -n '/^Package: qemu-guest-agent$/,/^$/s/^Version: //p')
    qgaver=${qgaver%%$'\n'*}
}

apt_updated=0
apt_update() {
    [ "$apt_updated" = 1 ] && return 0
    [ "$(id -u)" = 0 ] || die "apt lists lack what is needed and not root: run 'apt-get update' as root"
    log "running apt-get update"
    apt-get update -qq >&2 || die "apt-get update failed"
    apt_updated=1
}

base=$TARGET_DIR/test-guest
mkdir -p "$base"
exec 9>"$base/build.lock"
flock 9

# Resolving costs a second per run, and tests run us once per test process:
# remember the answer for as long as apt's package lists and sources are the
# same files (an apt-get update that changes anything changes their mtimes).
resolved=$base/resolved.env
apt_stamp() {
    { stat -c '%n %s %Y' /var/lib/apt/lists/*_Packages* /etc/apt/sources.list \
        /etc/apt/sources.list.d/* /etc/apt/preferences /etc/apt/preferences.d/* 2>/dev/null || true; } |
        sha256sum | cut -c1-16
}

# Sets kpkg kver bbver qgaver krel and out (the cache directory for them).
resolve() {
    local stamp inputs_hash
    stamp=$(apt_stamp)
    kpkg= kver= bbver= qgaver=
    if [ -f "$resolved" ] && grep -qx "APT_STAMP=$stamp" "$resolved"; then
        . "$resolved"
    fi
    if [ -z "$kpkg" ] || [ -z "$kver" ] || [ -z "$bbver" ] || [ -z "$qgaver" ]; then
        resolve_packages
        if [ -z "$kpkg" ] || [ -z "$kver" ] || [ -z "$bbver" ] || [ -z "$qgaver" ]; then
            apt_update
            stamp=$(apt_stamp)
            resolve_packages
            [ -n "$kpkg" ] && [ -n "$kver" ] && [ -n "$bbver" ] && [ -n "$qgaver" ] ||
                die "cannot resolve $KERNEL_META, busybox-static and qemu-guest-agent with apt-cache"
        fi
        printf 'APT_STAMP=%s\nkpkg=%q\nkver=%q\nbbver=%q\nqgaver=%q\n' \
            "$stamp" "$kpkg" "$kver" "$bbver" "$qgaver" >"$resolved"
    fi
    krel=${kpkg#linux-image-}
    inputs_hash=$( { sha256sum "$INIT_SRC" "${BASH_SOURCE[0]}" | cut -d' ' -f1; echo "$bbver $qgaver"; } |
        sha256sum | cut -c1-8)
    out=$base/${krel}_${kver}-${inputs_hash}
}

# A directory is complete by construction (renamed into place when done).
print_if_cached() {
    if [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.img" ] && [ -f "$out/guest.env" ]; then
        echo "$out"
        exit 0
    fi
}

resolve
print_if_cached

start=$(date +%s.%N)
# Leftovers of builds that were killed midway (we hold the lock, so none is live).
rm -rf "$base"/.tmp.*
stage=$(mktemp -d "$base/.tmp.XXXXXX")
trap 'rm -rf "$stage"' EXIT

# apt-get download drops to user _apt and writes into the current directory.
mkdir -p "$stage/debs"
chmod 0777 "$stage/debs"
chmod 0755 "$stage"
download() {
    (cd "$stage/debs" && apt-get download -qq "$kpkg=$kver" "busybox-static=$bbver" \
        "qemu-guest-agent=$qgaver" >&2)
}
if ! download; then
    # Stale lists can name a version the mirror no longer has: update, and
    # build what the fresh lists name.
    apt_update
    rm -f "$resolved"
    resolve
    print_if_cached
    download || die "apt-get download failed"
fi
log "building $out ($kpkg $kver, busybox-static $bbver, qemu-guest-agent $qgaver)"

kdeb=$(ls "$stage"/debs/linux-image-*.deb)
bbdeb=$(ls "$stage"/debs/busybox-static_*.deb)
dpkg-deb -x "$kdeb" "$stage/kernel"
dpkg-deb -x "$bbdeb" "$stage/busybox"
qgadeb=$(ls "$stage"/debs/qemu-guest-agent_*.deb)
dpkg-deb -x "$qgadeb" "$stage/qga"

vmlinuz=$stage/kernel/boot/vmlinuz-$krel
[ -f "$vmlinuz" ] || die "no /boot/vmlinuz-$krel in $kdeb"
moddirs=("$stage"/kernel/lib/modules/*)
moddir=${moddirs[0]}
[ -d "$moddir" ] || die "no /lib/modules in $kdeb"
busybox=$stage/busybox/bin/busybox
[ -x "$busybox" ] || die "no /bin/busybox in $bbdeb"

# --- initramfs tree ---------------------------------------------------------
root=$stage/root
mkdir -p "$root"/{bin,dev,etc,lib/modules,proc,sys,tmp,run,var/log,root}
ln -s bin "$root/sbin"
ln -s ../run "$root/var/run"
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
done
install -m 0755 "$INIT_SRC" "$root/init"

# --- the QEMU guest agent (started by /init with guest.agent=on) -------------
qga=$stage/qga/usr/sbin/qemu-ga
[ -x "$qga" ] || die "no /usr/sbin/qemu-ga in $qgadeb"
install -m 0755 "$qga" "$root/bin/qemu-ga"
# ldd prints "NAME => PATH (ADDR)" per library and "PATH (ADDR)" for the
# loader; each goes to the same path in the guest (symlinks resolved).
qga_libs=$(ldd "$qga") || die "ldd $qga failed"
if printf '%s\n' "$qga_libs" | grep -q 'not found'; then
    die "qemu-ga needs libraries the host lacks (run scripts/setup.sh --test): $(printf '%s\n' "$qga_libs" | grep 'not found' | tr '\n' ' ')"
fi
for lib in $(printf '%s\n' "$qga_libs" | sed -n 's/.*=> \(\/[^ ]*\) .*/\1/p; s/^[[:space:]]*\(\/[^ ]*\) .*/\1/p'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
# What guest-get-osinfo reports.
cat >"$root/etc/os-release" <<'EOF'
ID=vmlet-test-guest
NAME="vmlet test guest"
VERSION_ID=1
PRETTY_NAME="vmlet test guest 1"
EOF

# --- modules ------------------------------------------------------------------
# Index every module file by its name with '-' folded to '_' (depends= and the
# kernel use '_'; some files are named with '-', e.g. virtio-rng.ko).
declare -A modfile=()
while IFS= read -r f; do
    n=${f##*/}; n=${n%%.ko*}; n=${n//-/_}
    modfile[$n]=$f
done < <(find "$moddir/kernel" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz')
declare -A builtin=()
if [ -f "$moddir/modules.builtin" ]; then
    while IFS= read -r f; do
        n=${f##*/}; n=${n%%.ko*}; builtin[${n//-/_}]=1
    done < "$moddir/modules.builtin"
fi

# busybox insmod takes plain .ko files only: decompress at build time.
decompress_module() { # src dst
    case "$1" in
        *.ko) cp "$1" "$2" ;;
        *.ko.xz) "$busybox" unxz -c "$1" > "$2" ;;
        *.ko.gz) gzip -dc "$1" > "$2" ;;
        *.ko.zst)
            command -v zstd >/dev/null 2>&1 || die "zstd-compressed modules need 'zstd' (apt-get install zstd)"
            zstd -q -dc "$1" > "$2" ;;
    esac
}

# Debian signs its modules and the kernel checks each signature at insmod,
# which under TCG costs about 0.2 s of a boot for these modules. Unless the
# kernel insists on signatures (MODULE_SIG_FORCE), drop them: the kernel
# then loads the modules as unsigned (tainted, one notice-level log line).
# (An EFI Secure Boot guest refuses them, and then has no virtio devices;
# the Secure Boot tests need only the serial console and efivarfs, which is
# kept signed: see SIGNED_ON_DEMAND_MODULES.)
strip_signatures=1
grep -qx 'CONFIG_MODULE_SIG_FORCE=y' "$stage/kernel/boot/config-$krel" 2>/dev/null && strip_signatures=0
sig_magic='~Module signature appended~'
strip_signature() { # file: removes an appended module signature, if any
    local f=$1 size sig_len
    # The magic ends in a newline, which $(...) drops.
    [ "$(tail -c 28 "$f")" = "$sig_magic" ] || return 0
    size=$(stat -c %s "$f")
    # struct module_signature (12 bytes) precedes the magic; sig_len is its
    # last field, a big-endian u32.
    sig_len=$(od -An -tu1 -j $((size - 32)) -N 4 "$f" |
        awk '{ print (($1 * 256 + $2) * 256 + $3) * 256 + $4 }')
    truncate -s $((size - 28 - 12 - sig_len)) "$f"
}

declare -A state=() # name -> visiting|done
order=()
add_module() { # name, resolved depth-first so dependencies come first
    local n=${1//-/_} dst deps d
    [ "${state[$n]:-}" = done ] && return 0
    [ "${state[$n]:-}" = visiting ] && die "module dependency cycle at $n"
    if [ -n "${builtin[$n]:-}" ]; then state[$n]=done; return 0; fi
    [ -n "${modfile[$n]:-}" ] || die "module $n not found in $kdeb"
    state[$n]=visiting
    dst=$root/lib/modules/$n.ko
    decompress_module "${modfile[$n]}" "$dst"
    [ "$strip_signatures" = 0 ] || strip_signature "$dst"
    deps=$(tr '\0' '\n' < "$dst" | sed -n 's/^depends=//p')
    deps=${deps%%$'\n'*}
    for d in ${deps//,/ }; do add_module "$d"; done
    state[$n]=done
    order+=("$n")
}
for m in "${WANTED_MODULES[@]}"; do add_module "$m"; done
printf '%s\n' "${order[@]}" > "$root/lib/modules/load-order"
on_demand=()
for m in "${SIGNED_ON_DEMAND_MODULES[@]}"; do
    n=${m//-/_}
    [ -z "${builtin[$n]:-}" ] || continue
    [ -n "${modfile[$n]:-}" ] || die "module $n not found in $kdeb"
    decompress_module "${modfile[$n]}" "$root/lib/modules/$n.ko"
    deps=$(tr '\0' '\n' < "$root/lib/modules/$n.ko" | sed -n 's/^depends=//p')
    [ -z "${deps%%$'\n'*}" ] || die "on-demand module $n depends on ${deps%%$'\n'*}"
    on_demand+=("$n")
done

# --- outputs ----------------------------------------------------------------
mkdir "$stage/out"
(cd "$root" && find . | LC_ALL=C sort | "$busybox" cpio -o -H newc -R 0:0 2>/dev/null) |
    gzip -6 -n > "$stage/out/initrd.img"
cp "$vmlinuz" "$stage/out/vmlinuz"
cat > "$stage/out/guest.env" <<EOF
KERNEL_PACKAGE=$kpkg
KERNEL_PACKAGE_VERSION=$kver
KERNEL_RELEASE=$krel
BUSYBOX_VERSION=$bbver
QEMU_GUEST_AGENT_VERSION=$qgaver
INPUTS_HASH=${out##*-}
MODULE_SIGNATURES_STRIPPED=$strip_signatures
MODULES="${order[*]}"
SIGNED_ON_DEMAND_MODULES="${on_demand[*]}"
EOF
mv -T "$stage/out" "$out"
log "built in $(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }') s: $(du -h "$out/initrd.img" | cut -f1) initramfs, ${#order[@]} modules"
echo "$out"
