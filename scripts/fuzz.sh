#!/usr/bin/env bash
# Builds the libFuzzer targets of tests/fuzz with clang (ASan+UBSan) in build-fuzz/ and runs each
# for a fixed time (FUZZ_SECONDS, default 20) from a copy of its kept corpus
# (build-fuzz/corpus-<target>/), so the repository's corpus is never changed by a run. A crash
# fails the script; the input that caused it is left in build-fuzz/crashes/ and belongs, once
# fixed, in tests/fuzz/regress/<target>/.
# Prints one line per target: executions, executions per second, corpus size.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-20}
targets=(infer rest npy safetensors ctl plan)
mkdir -p build-fuzz
if ! { CC=clang cmake -S . -B build-fuzz -DTP_FUZZ=ON -DTP_WERROR=ON &&
       cmake --build build-fuzz -j"$(nproc)" --target "${targets[@]/#/fuzz_}"; } \
       >build-fuzz/build.log 2>&1; then
    tail -40 build-fuzz/build.log >&2
    echo "fuzz: building the targets failed (build-fuzz/build.log)" >&2
    exit 1
fi
mkdir -p build-fuzz/crashes
status=0
for t in "${targets[@]}"; do
    work=build-fuzz/corpus-$t
    rm -rf "$work"
    mkdir -p "$work"
    cp -r "tests/fuzz/corpus/$t/." "$work/"
    [ -d "tests/fuzz/regress/$t" ] && cp -r "tests/fuzz/regress/$t/." "$work/"
    log=build-fuzz/fuzz_$t.log
    if ! ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
        "build-fuzz/bin/fuzz_$t" -max_total_time="$seconds" -max_len=65536 -timeout=10 \
        -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="build-fuzz/crashes/$t-" \
        "$work" >"$log" 2>&1; then
        echo "fuzz_$t: FAILED, see $log and build-fuzz/crashes/" >&2
        tail -40 "$log" >&2
        status=1
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
    echo "fuzz_$t: ${runs:-?} executions in ${seconds} s (${rate:-?}/s), corpus $(ls "$work" | wc -l) inputs"
done
exit $status
