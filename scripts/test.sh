#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds the test guest,
# checks formatting and lints, runs every test, then checks that no QEMU
# process, socket, temp directory, network namespace or tap made by the
# tests is left behind.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

scripts/setup.sh --test
scripts/build-test-guest.sh >/dev/null

echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy"
cargo clippy --quiet --all-targets -- -D warnings

echo "== cargo test"
cargo test --quiet 2>&1 | tee target/test-output.txt
status=${PIPESTATUS[0]}
[ "$status" = 0 ] || exit "$status"

echo "== leftovers"
# Tests put every run directory and scratch file under /tmp/vmlet-test-*.
left=0
if pgrep -af 'vmlet-test-' | grep -v pgrep; then
    echo "FAIL: QEMU processes left by the tests (above)"; left=1
fi
if compgen -G '/tmp/vmlet-test-*' >/dev/null; then
    echo "FAIL: temp files left by the tests:"; ls -d /tmp/vmlet-test-*; left=1
fi
# Network tests make their own namespaces (vmlet-test-*): the bridges,
# VLANs and taps they made live and die with them.
if ip netns list 2>/dev/null | grep -q '^vmlet-test-'; then
    echo "FAIL: network namespaces left by the tests:"; ip netns list | grep '^vmlet-test-'; left=1
fi
if ip -o link show 2>/dev/null | grep -Eq ': vmt[0-9a-f]{12}[:@]'; then
    echo "FAIL: vmlet taps left in the host namespace:"; ip -o link show | grep -E ': vmt[0-9a-f]{12}'; left=1
fi
[ "$left" = 0 ] && echo "no QEMU process, socket, temp file, namespace or tap left"
exit "$left"
