#!/usr/bin/env bash
# Boots the project's test guest (Debian cloud kernel + busybox initramfs)
# with `vmlet run`: its serial console streams here, Ctrl-C stops it through
# the ACPI power button (a second Ctrl-C forces it off).
#
#   scripts/run-test-guest.sh                 # q35, guest waits for Ctrl-C
#   PROFILE=microvm ACTION=poweroff scripts/run-test-guest.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh" --test
guest=$("$root/scripts/build-test-guest.sh" | tail -n 1)
profile=${PROFILE:-q35}
action=${ACTION:-hold}
cmdline="console=ttyS0 panic=-1 quiet guest.action=$action"
if [ "$profile" = microvm ]; then
    # Under TCG a microvm guest may hang calibrating the TSC without this.
    mhz=$(awk -F: '/^cpu MHz/ {printf "%d", $2; exit}' /proc/cpuinfo)
    [ -n "$mhz" ] && cmdline="$cmdline tsc_early_khz=$((mhz * 1000))"
fi
work=$(mktemp -d /tmp/vmlet-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
qemu-img create -q -f qcow2 "$work/data.qcow2" 64M
cat > "$work/spec.json" <<SPEC
{
  "name": "test-guest",
  "vcpus": 1,
  "memory_mib": 256,
  "profile": "$profile",
  "boot": {"type": "kernel", "kernel": "$guest/vmlinuz", "initrd": "$guest/initrd.img",
           "cmdline": "$cmdline"},
  "disks": [{"name": "data", "path": "$work/data.qcow2", "format": "qcow2"}],
  "channels": [{"name": "org.vmlet.guest.0"}]
}
SPEC
echo "spec: $(cat "$work/spec.json")" >&2
"$root/scripts/vmlet" run --run-dir "$work/run" "$work/spec.json"
