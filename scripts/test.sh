#!/usr/bin/env bash
# Installs the dependencies, builds tpd and runs every test (unit and integration) with ctest;
# then the same suite again on an ASan+UBSan build (build-asan/, LeakSanitizer on: a leak makes a
# process exit non-zero, which fails its test), and each fuzz target for FUZZ_SECONDS (default 20)
# (scripts/fuzz.sh, clang, build-fuzz/). TP_QUICK=1 runs only the first suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
python=$(scripts/venv.sh)
perf_analyzer=$(scripts/perf-analyzer.sh)
kserve_python=$(scripts/venv-kserve.sh)
scripts/build.sh -DTP_PYTHON="$python" -DTP_PERF_ANALYZER="$perf_analyzer" \
    -DTP_KSERVE_PYTHON="$kserve_python"
(cd build && ctest --output-on-failure --timeout 600)
# the GPU check's dry run (no GPU needed): the bundle a GPU machine gets, its programs on the CPU,
# the script itself; a build without the CUDA backend has nothing to bundle
if [ -x build/bin/tp_gpu_probe ]; then
    bench/gpu-check.sh --bundle
    bench/gpu-check.sh --dry-run build/gpu-bundle.tar.gz
fi
if [ "${TP_QUICK:-0}" = 1 ]; then exit 0; fi

cmake -S . -B build-asan -DTP_WERROR=ON -DTP_SANITIZE=ON -DTP_PYTHON="$python" \
    -DTP_PERF_ANALYZER="$perf_analyzer" -DTP_KSERVE_PYTHON="$kserve_python" >/dev/null
cmake --build build-asan -j"$(nproc)"
(cd build-asan &&
    ASAN_OPTIONS=detect_leaks=1:halt_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
    ctest --output-on-failure --timeout 900)

scripts/fuzz.sh
