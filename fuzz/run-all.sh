#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 150) each, one after the other, each in a single
# libFuzzer process (no -jobs/-workers: on a shared 2-core machine one core is plenty), with
# the checked-in seeds read from fuzz/corpus/<target>/ and new inputs written to a scratch dir
# (so the checked-in corpus stays small). Prints each run's last status line; crashes land in
# fuzz/artifacts/<target>/. Needs the nightly toolchain and `cargo install cargo-fuzz`.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-150}"
scratch="${FUZZ_SCRATCH:-${TMPDIR:-/tmp}/pgshift-fuzz-corpus}"
targets=(startup framing options sasl)
cargo +nightly fuzz build
for target in "${targets[@]}"; do
    mkdir -p "$scratch/$target"
    log="$scratch/$target.log"
    echo "== $target: ${seconds}s"
    status=0
    cargo +nightly fuzz run "$target" "$scratch/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1 || status=$?
    grep -E "^#[0-9]+.*(DONE|pulse|NEW|REDUCE)" "$log" | tail -n 1 || true
    grep -E "stat::number_of_executed_units|stat::peak_rss_mb" "$log" || true
    echo "   exit status $status (log: $log)"
done
