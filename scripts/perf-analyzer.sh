#!/usr/bin/env bash
# Installs Triton's perf_analyzer where Debian 12 can run it, and prints the path of a program
# that runs it: build/perf_analyzer. The only build of it that runs on glibc 2.36 is the one
# inside the tritonclient 2.51.0 wheel (later wheels, and the standalone perf-analyzer package,
# need glibc 2.38; `pip install perf-analyzer` alone gives a 0.1.0 package without the binary).
# It needs libcudart.so.12, which PyPI's nvidia-cuda-runtime-cu12 provides (no GPU is used), and
# Debian's libb64-0d (scripts/deps.sh). Its own venv, build/venv-pa, keeps tritonclient 2.51 away
# from the tests' newer one. The wrapper points the loader at that libcudart only for
# perf_analyzer, and says what is missing when something is.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=build/venv-pa
pa=$venv/bin/perf_analyzer
if [ ! -x "$pa" ]; then
    mkdir -p build
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install -q --disable-pip-version-check "tritonclient[grpc]==2.51.0" \
        nvidia-cuda-runtime-cu12 >&2
fi
cudart=$(find "$PWD/$venv" -path "*/nvidia/cuda_runtime/lib/libcudart.so.12" | head -1)
[ -n "$cudart" ] || { echo "perf-analyzer.sh: no libcudart.so.12 in $venv" >&2; exit 1; }
cat >build/perf_analyzer <<WRAP
#!/bin/sh
# Triton's perf_analyzer of tritonclient 2.51.0, with the libcudart it needs (scripts/perf-analyzer.sh)
LD_LIBRARY_PATH=$(dirname "$cudart")\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH} exec $PWD/$pa "\$@"
WRAP
chmod +x build/perf_analyzer
build/perf_analyzer --version >/dev/null 2>&1 || {
    echo "perf-analyzer.sh: build/perf_analyzer does not run:" >&2
    build/perf_analyzer --version >&2 || true
    exit 1
}
echo "$PWD/build/perf_analyzer"
