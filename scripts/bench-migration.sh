#!/usr/bin/env bash
# Benchmark of live migration (release build, test guest under TCG): two
# daemons on loopback move a 256 MiB guest with a 64 MiB disk full of data
# back and forth, and the total time and downtime are printed (medians).
# Prints figures; fails only if something breaks, never on speed.
#   BENCH_RUNS=N  migrations (default 5)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh --test
guest=$(scripts/build-test-guest.sh | tail -n 1)
cargo build --release --quiet --example bench_migration --bin vmlet
export BENCH_KERNEL="$guest/vmlinuz" BENCH_INITRD="$guest/initrd.img"
target_dir=${CARGO_TARGET_DIR:-target}
export BENCH_VMLET=${BENCH_VMLET:-$target_dir/release/vmlet}

echo "== vmlet live migration ($(nproc) cores, $(qemu-system-x86_64 --version | head -n1))"
"$target_dir/release/examples/bench_migration"
