#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU (no network needed), runs the gpu tests (among
# them the batch-invariance measurement: does a row's answer change with its batch?), times
# cuBLAS GEMMs at 4096^3 (FP32, TF32, BF16) and tpd's end-to-end forward latency at
# in = out = 4096 for batch 1, 64 and 1024 in both gather modes, and prints a short table last.
# Takes a few minutes; its parts have time limits that keep the whole under 8 minutes.
#
#   bench/gpu-check.sh --bundle [DIR]   on the build machine: copy the programs and the shared
#                                       libraries they need (ldd) into DIR (default
#                                       build/gpu-bundle) and DIR.tar.gz, then exit
#   bench/gpu-check.sh                  on the GPU machine: run the check
#
# Where the programs come from, first found: $TP_BIN (a folder with tpd, tpd-worker, tpclient,
# tp_gpu_probe, gemm_cublas; libraries from $TP_LIB); build/gpu-bundle/; build/gpu-bundle.tar.gz
# (unpacked); build/bin/; else it builds with CMake (needs gRPC and protobuf-c development files).
# The CUDA libraries (cuBLAS, NCCL) are not bundled unless --with-cuda-libs: the GPU machine's
# CUDA toolkit provides them (the same major version, 13, as the build). TP_CHECK_PARTS (default
# "tests gemm forward") runs only the parts named, e.g. to redo the timings. Exit status: 0 when
# every check passed, 1 when one failed, 77 when no GPU is usable (after saying why).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

progs=(tpd tpd-worker tpclient tp_gpu_probe gemm_cublas)

# glibc and the dynamic loader come from the target system; so does the CUDA driver
is_system_lib() {
    case "$(basename "$1")" in
    libc.so.* | libm.so.* | libpthread.so.* | libdl.so.* | librt.so.* | ld-linux*.so.* | \
        libresolv.so.* | libutil.so.* | libcuda.so.* | linux-vdso.so.*) return 0 ;;
    esac
    return 1
}

bundle() {
    local dir=$1 with_cuda=$2 lib real n=0
    [ -x build/bin/tpd ] || { echo "gpu-check: build/bin/tpd is missing: run scripts/build.sh" >&2; exit 1; }
    [ -x build/bin/tp_gpu_probe ] || {
        echo "gpu-check: build/bin/tp_gpu_probe is missing: this build has no CUDA backend" >&2; exit 1; }
    rm -rf "$dir" "$dir.tar.gz"
    mkdir -p "$dir/bin" "$dir/lib"
    for p in "${progs[@]}"; do
        cp "build/bin/$p" "$dir/bin/"
    done
    for lib in $(for p in "${progs[@]}"; do ldd "build/bin/$p"; done |
        awk '$2 == "=>" && $3 ~ /^\// {print $3}' | sort -u); do
        is_system_lib "$lib" && continue
        real=$(readlink -f "$lib")
        case "$real" in
        /usr/local/cuda*) [ "$with_cuda" = 1 ] || { echo "not bundled (CUDA toolkit): $lib"; continue; } ;;
        esac
        cp -L "$lib" "$dir/lib/$(basename "$lib")"
        n=$((n + 1))
    done
    tar -C "$(dirname "$dir")" -czf "$dir.tar.gz" "$(basename "$dir")"
    echo "bundled ${#progs[@]} programs and $n libraries into $dir ($(du -sh "$dir" | cut -f1))" \
        "and $dir.tar.gz ($(du -sh "$dir.tar.gz" | cut -f1))"
}

if [ "${1:-}" = "--bundle" ]; then
    dir=${2:-build/gpu-bundle}
    with_cuda=0
    [ "${3:-}" = "--with-cuda-libs" ] && with_cuda=1
    bundle "$dir" "$with_cuda"
    exit 0
fi
[ $# -eq 0 ] || { echo "usage: $0 [--bundle [DIR [--with-cuda-libs]]]" >&2; exit 64; }

start=$(date +%s)
budget=460 # seconds: the whole check stays under 8 minutes
left() { echo $((budget - ($(date +%s) - start))); }
# a timeout of at most $1 seconds that keeps 90 s of the budget for the timings (never 0, which
# would mean no limit to timeout(1))
tmo() {
    local l=$(($(left) - 90))
    [ "$l" -gt "$1" ] && l=$1
    [ "$l" -lt 10 ] && l=10
    echo "$l"
}

work=$(mktemp -d)
unpack=
tp_pid=
cleanup() {
    [ -n "$tp_pid" ] && kill -TERM "$tp_pid" 2>/dev/null && wait "$tp_pid" 2>/dev/null
    rm -rf "$work" ${unpack:+"$unpack"}
}
trap cleanup EXIT

# --- the programs -------------------------------------------------------------------------------
lib=${TP_LIB:-}
if [ -n "${TP_BIN:-}" ]; then
    bin=$TP_BIN
elif [ -x build/gpu-bundle/bin/tpd ]; then
    bin=$root/build/gpu-bundle/bin lib=$root/build/gpu-bundle/lib
elif [ -f build/gpu-bundle.tar.gz ]; then
    unpack=$(mktemp -d)
    tar -C "$unpack" -xzf build/gpu-bundle.tar.gz
    bin=$unpack/gpu-bundle/bin lib=$unpack/gpu-bundle/lib
elif [ -x build/bin/tpd ]; then
    bin=$root/build/bin
else
    echo "gpu-check: no programs found: building with CMake"
    cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null && cmake --build build -j"$(nproc)" ||
        { echo "gpu-check: the build failed (gRPC and protobuf-c development files are needed;" \
            "or build elsewhere and bring build/gpu-bundle.tar.gz: bench/gpu-check.sh --bundle)" >&2
          exit 1; }
    bin=$root/build/bin
fi
for c in /usr/local/cuda/lib64 /usr/local/cuda/lib; do
    [ -d "$c" ] && lib=${lib:+$lib:}$c
done
export LD_LIBRARY_PATH=${lib}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
echo "programs: $bin"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
missing=0
for p in "${progs[@]}"; do
    [ -x "$bin/$p" ] || { echo "gpu-check: $bin/$p is missing (a build without CUDA?)" >&2; missing=1; continue; }
    if ldd "$bin/$p" | grep -q "not found"; then
        echo "gpu-check: $p cannot load:" >&2
        ldd "$bin/$p" | grep "not found" >&2
        missing=1
    fi
done
[ "$missing" = 0 ] || { echo "gpu-check: missing programs or libraries, see above" >&2; exit 1; }

# --- the GPU ------------------------------------------------------------------------------------
probe=$("$bin/tp_gpu_probe")
probe_rc=$?
echo "$probe"
if [ "$probe_rc" -ne 0 ]; then
    if command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q "^GPU "; then
        # the driver sees GPUs: a runtime that cannot use them is a failure, not a skip
        nvidia-smi -L
        echo "gpu-check: FAILED: nvidia-smi lists GPUs but the CUDA runtime cannot use them: $probe"
        exit 1
    fi
    echo "gpu-check: SKIPPED: $probe"
    exit 77
fi
ngpus=$(echo "$probe" | sed -n 's/^gpus: //p')
gpu_name=$(echo "$probe" | sed -n 's/^gpu 0: //p')
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,driver_version,memory.total \
    --format=csv,noheader
export TPD=$bin/tpd TPCLIENT=$bin/tpclient TP_GPU_PROBE=$bin/tp_gpu_probe PYTHONDONTWRITEBYTECODE=1
py=$(command -v python3 || command -v python)
status=0

parts=" ${TP_CHECK_PARTS:-tests gemm forward} "
want() { [[ "$parts" == *" $1 "* ]]; }

# --- the gpu tests ------------------------------------------------------------------------------
declare -A result
invariance=
want tests && for t in test_gpu_cli:120 test_gpu_forward:240 test_gpu_invariance:120; do
    limit=${t#*:} t=${t%:*}
    echo "== $t"
    timeout -k 10 "$(tmo "$limit")" "$py" "tests/gpu/$t.py" >"$work/$t.out" 2>&1
    rc=$?
    tail -60 "$work/$t.out"
    [ "$t" = test_gpu_invariance ] && invariance=$(grep "^batch invariance" "$work/$t.out")
    case $rc in
    0) result[$t]=ok ;; 77) result[$t]=skipped ;; 124) result[$t]="TIMED OUT"; status=1 ;;
    *) result[$t]="FAILED (exit $rc)"; status=1 ;;
    esac
done

# --- cuBLAS GEMM --------------------------------------------------------------------------------
gemm=
if want gemm; then
    echo "== cuBLAS GEMM"
    gemm=$(timeout 120 "$bin/gemm_cublas" --n 4096 --iters 20) || status=1
    echo "$gemm"
fi
tflops() { echo "$gemm" | sed -n "s/^gemm $1 [0-9x]*: \([0-9.]*\) TFLOP.*/\1/p"; }

# --- end-to-end forward ------------------------------------------------------------------------
want forward && echo "== forward latency, in = out = 4096"
want forward && "$py" - "$work/layer.safetensors" <<'EOF'
import array, json, random, struct, sys
n = 4096
rng = random.Random(1)
block = array.array("f", (rng.uniform(-1 / 64, 1 / 64) for _ in range(1 << 20)))
w = block * (n * n // len(block))
b = array.array("f", block[:n])
hdr = json.dumps({"weight": {"dtype": "F32", "shape": [n, n], "data_offsets": [0, 4 * n * n]},
                  "bias": {"dtype": "F32", "shape": [n], "data_offsets": [4 * n * n, 4 * n * n + 4 * n]}}).encode()
hdr += b" " * (-len(hdr) % 8)
with open(sys.argv[1], "wb") as f:
    f.write(struct.pack("<Q", len(hdr)) + hdr)
    w.tofile(f)
    b.tofile(f)
EOF
if ! want forward; then
    configs=()
elif [ "$ngpus" -ge 2 ]; then
    all=$(seq -s, 0 $((ngpus > 8 ? 7 : ngpus - 1)))
    configs=("nccl $all" "host $all")
else
    configs=("nccl 0" "host 0" "host 0,0")
fi
declare -A lat
sock="unix:$work/tpd.sock"
for cfg in "${configs[@]}"; do
    read -r mode gpus <<<"$cfg"
    [ "$(left)" -gt 30 ] || { echo "gpu-check: out of time, skipping $cfg"; status=1; continue; }
    "$bin/tpd" --listen "$sock" --metrics-listen 127.0.0.1:0 --weights "$work/layer.safetensors" --gpus "$gpus" \
        --gather "$mode" --max-batch 1024 --log-level warn 2>"$work/tpd.log" &
    tp_pid=$!
    ready=0
    for _ in $(seq 900); do
        "$bin/tpclient" --server "$sock" health >/dev/null 2>&1 && { ready=1; break; }
        kill -0 "$tp_pid" 2>/dev/null || break
        sleep 0.2
    done
    if [ "$ready" = 0 ]; then
        echo "gpu-check: tpd --gpus $gpus --gather $mode did not become ready:" >&2
        tail -5 "$work/tpd.log" >&2
        status=1
        kill -KILL "$tp_pid" 2>/dev/null; wait "$tp_pid" 2>/dev/null; tp_pid=
        continue
    fi
    for rows in 1 64 1024; do
        iters=$([ "$rows" = 1024 ] && echo 30 || echo 200)
        out=$(timeout 120 "$bin/tpclient" --server "$sock" bench --rows "$rows" --iters "$iters" \
            --warmup 5 2>&1)
        echo "--gather $mode --gpus $gpus, batch $rows: $(echo "$out" | grep latency)"
        p50=$(echo "$out" | sed -n 's/.*p50 \([0-9.]*\).*p99 \([0-9.]*\).*/\1 (\2)/p')
        lat["$cfg $rows"]=${p50:-failed}
        [ -n "$p50" ] || { status=1; echo "$out" | tail -3; }
    done
    kill -TERM "$tp_pid"; wait "$tp_pid"; tp_pid=
done

# --- the table ----------------------------------------------------------------------------------
echo
echo "== GPU check summary ($ngpus GPU(s); gpu 0: $gpu_name; $(($(date +%s) - start)) s)"
echo "tests: test_gpu_cli ${result[test_gpu_cli]:-not run}, test_gpu_forward ${result[test_gpu_forward]:-not run}," \
    "test_gpu_invariance ${result[test_gpu_invariance]:-not run}"
[ -n "$invariance" ] && echo "$invariance"
printf "cuBLAS 4096^3 TFLOP/s: FP32 %s, TF32 %s, BF16 %s\n" "$(tflops fp32)" "$(tflops tf32)" \
    "$(tflops bf16)"
echo "tpd forward, in = out = 4096, FP32, p50 ms (p99), tpclient bench over a unix socket:"
printf "%-7s %-16s %-18s %-18s %-18s\n" gather gpus "batch 1" "batch 64" "batch 1024"
for cfg in "${configs[@]}"; do
    read -r mode gpus <<<"$cfg"
    printf "%-7s %-16s %-18s %-18s %-18s\n" "$mode" "$gpus" "${lat["$cfg 1"]:-}" \
        "${lat["$cfg 64"]:-}" "${lat["$cfg 1024"]:-}"
done
exit $status
