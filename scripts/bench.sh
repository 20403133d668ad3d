#!/usr/bin/env bash
# Benchmarks of the QEMU runtime and of the daemon (release build, test
# guest under TCG).
# Prints figures; fails only if something breaks, never on speed.
#   BENCH_RUNS=N  samples per figure (default 5)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh --test
guest=$(scripts/build-test-guest.sh | tail -n 1)
cargo build --release --quiet --example bench --example bench_daemon --bin vmlet
export BENCH_KERNEL="$guest/vmlinuz" BENCH_INITRD="$guest/initrd.img"

echo "== vmlet bench ($(nproc) cores, $(qemu-system-x86_64 --version | head -n1))"
target/release/examples/bench

# The foreground runner's own memory while a guest runs.
work=$(mktemp -d /tmp/vmlet-bench.XXXXXX)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
cat > "$work/spec.json" <<SPEC
{"name": "bench", "vcpus": 1, "memory_mib": 128,
 "boot": {"type": "kernel", "kernel": "$BENCH_KERNEL", "initrd": "$BENCH_INITRD",
          "cmdline": "console=ttyS0 panic=-1 quiet guest.action=hold"}}
SPEC
target/release/vmlet run --accel tcg --run-dir "$work/run" "$work/spec.json" >"$work/out" 2>&1 &
pid=$!
for _ in $(seq 1 600); do grep -q GUEST-READY "$work/out" && break; sleep 0.1; done
grep -q GUEST-READY "$work/out" || { cat "$work/out"; exit 1; }
printf '%-40s%s\n' "vmlet run RSS with one guest:" "$(awk '/VmRSS/ {printf "%.1f MiB", $2/1024}' "/proc/$pid/status")"
kill -INT "$pid"
wait "$pid" || true

# The daemon: `vmlet serve` on a scratch state dir, driven over its socket.
echo "== vmlet serve"
target/release/examples/bench_daemon
