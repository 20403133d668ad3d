#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds the test guest,
# checks formatting and lints, runs every test, then checks that no QEMU
# process, socket, temp directory, network namespace or tap made by the
# tests is left behind. Ends with the list of tests that could not run their
# subject on this host (a skip is not a failure: the exit status ignores it).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

# A test that cannot run its subject here appends one "SKIPPED: ..." line to
# this file (tests/common/skip.rs); cargo test hides the output of passing
# tests, so the lines are listed at the very end, also when tests fail.
export VMLET_SKIP_LOG="$root/target/skips.txt"
mkdir -p "$root/target"
: >"$VMLET_SKIP_LOG"
tests_ran=0
skip_summary() {
    [ "$tests_ran" = 1 ] || return 0
    local n
    n=$(grep -c '^SKIPPED: ' "$VMLET_SKIP_LOG" 2>/dev/null || true)
    echo "== skipped tests (${n:-0})"
    if [ "${n:-0}" -gt 0 ]; then
        grep '^SKIPPED: ' "$VMLET_SKIP_LOG" | sort
    else
        echo "no test skipped"
    fi
}
trap skip_summary EXIT

scripts/setup.sh --test
scripts/build-test-guest.sh >/dev/null

echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy"
cargo clippy --quiet --all-targets -- -D warnings

echo "== cargo test"
tests_ran=1
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
