#!/usr/bin/env bash
# The GPU check: one command on a machine with an NVIDIA GPU (no network needed) that prints the
# environment it found (system, C/C++ runtime, driver, where cuBLAS and NCCL are), runs the gpu
# tests (among them the batch-invariance measurement), times cuBLAS GEMMs at 4096^3 (FP32, TF32,
# BF16) next to PyTorch's torch.matmul on the same GPU, times tpd's end-to-end forward at
# in = out = 4096 for batch 1, 64 and 1024 in both gather modes and a Llama-7B-shaped MLP block
# (hidden 4096, intermediate 11008) for batch 1 and 64 with the all-reduce in NCCL and on the
# host, and ends with one table. Every
# part has a time limit; the whole stays under TP_CHECK_BUDGET seconds (default 360).
#
#   bench/gpu-check.sh --bundle [DIR] [--with-cuda-libs]
#        on the build machine: copy the programs of $TP_BUILD_DIR/bin (default build/bin) and
#        the shared libraries they need into DIR (default build/gpu-bundle), with a MANIFEST,
#        and pack DIR.tar.gz, the one file to carry to the GPU machine (beside the repository)
#   bench/gpu-check.sh --dry-run [BUNDLE]
#        here, without a GPU (CI runs it): checks the bundle (DIR or DIR.tar.gz, default
#        build/gpu-bundle.tar.gz, else one made from $TP_BUILD_DIR), runs its programs on the
#        CPU and this script's parts that need no GPU; under a minute
#   bench/gpu-check.sh
#        on the GPU machine, from the repository root: the check
#
# The bundle holds what the build machine's distribution provides (gRPC, OpenBLAS, ...) and
# leaves the C and C++ runtime (glibc, libstdc++, libgcc_s), the driver and the CUDA libraries to
# the host: the programs find the bundle's libraries by their RPATH ($ORIGIN/../lib), so no
# LD_LIBRARY_PATH shadows the host's own programs (its Python). They load cuBLAS and NCCL with
# dlopen, from TPD_CUDA_LIBS first: the check looks for them in $TPD_CUDA_LIBS, /usr/local/cuda*,
# ldconfig's cache and every Python's site-packages/nvidia/*/lib, and sets TPD_CUDA_LIBS to what
# it found. --with-cuda-libs bundles them too (about 1 GB: too big to carry where 64 MiB is the
# limit).
#
# Where the programs come from, first found: $TP_BIN (a folder with tpd, tpd-worker, tpclient,
# tp_gpu_probe, gemm_cublas); build/gpu-bundle/; build/gpu-bundle.tar.gz (unpacked); build/bin/;
# else it builds with CMake (needs gRPC and protobuf-c development files). PyTorch for the
# comparison: $TP_TORCH_PYTHON, /opt/torch/.venv/bin/python, else the first python3 that imports
# torch. TP_CHECK_PARTS (default "tests gemm forward") runs only the parts named. Exit status: 0
# when every check passed, 1 when one failed, 77 when no GPU is usable (after saying why).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

progs=(tpd tpd-worker tpclient tp_gpu_probe gemm_cublas)
# the highest symbol versions a bundled file may need: glibc 2.34 (RHEL 9; Ubuntu 22.04 has
# 2.35), libstdc++ of GCC 11 (GLIBCXX_3.4.29)
glibc_max=2.34
glibcxx_max=3.4.29
carry_max_mib=48 # the tarball, leaving room for the repository under the 64 MiB carry limit
# the parts' time limits, in seconds; they add up to the default budget
env_s=15     # the environment, the library search, the probe
tests_s=170  # the gpu tests, all at once
gemm_s=75    # gemm_cublas (30) and torch.matmul with torch's import (45)
forward_s=70 # four tpd starts and their timings
block_s=30   # two starts of the MLP block (540 MB of FP32 weights) and their timings
declare -A chosen found result took lat where blat
invariance= gemm= torch_out= configs=() forward_what="in = out = 4096, FP32"
block_configs=() block_what="hidden 4096, intermediate 11008, FP32"

# --- helpers ------------------------------------------------------------------------------------

# what the host provides, never bundled: glibc and the loader, the C/C++ runtime, the driver;
# and the CUDA libraries, which the programs load at run time (bundled with --with-cuda-libs)
host_lib() {
    case "$(basename "$1")" in
    libc.so.* | libm.so.* | libpthread.so.* | libdl.so.* | librt.so.* | ld-linux*.so.* | \
        libresolv.so.* | libutil.so.* | linux-vdso.so.* | libstdc++.so.* | libgcc_s.so.* | \
        libcuda.so.* | libnvidia-*.so.*) return 0 ;;
    esac
    return 1
}
cuda_lib() {
    case "$(basename "$1")" in
    libcublas.so.* | libcublasLt.so.* | libnccl.so.* | libcudart.so.*) return 0 ;;
    esac
    return 1
}

# ver_le A B: version A <= version B
ver_le() { [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -1)" = "$1" ]; }

# needed FILE PREFIX: the highest PREFIX_x.y.z that FILE's undefined symbols need, or nothing
needed() {
    objdump -T "$1" 2>/dev/null | awk '/\*UND\*/' | grep -o "$2_[0-9][0-9.]*" | sed "s/^$2_//" |
        sort -uV | tail -1
}

# check_symbols DIR: prints each bundled file's highest GLIBC_ and GLIBCXX_ needs and fails if
# one exceeds glibc_max or glibcxx_max; sets floor_glibc and floor_glibcxx to the highest found
check_symbols() {
    local f g x bad=0
    floor_glibc=0 floor_glibcxx=0
    command -v objdump >/dev/null || { echo "gpu-check: objdump (binutils) is needed" >&2; return 1; }
    for f in "$1"/bin/* "$1"/lib/*; do
        g=$(needed "$f" GLIBC) x=$(needed "$f" GLIBCXX)
        [ -n "$g" ] && ! ver_le "$g" "$floor_glibc" && floor_glibc=$g
        [ -n "$x" ] && ! ver_le "$x" "$floor_glibcxx" && floor_glibcxx=$x
        if { [ -n "$g" ] && ! ver_le "$g" "$glibc_max"; } ||
            { [ -n "$x" ] && ! ver_le "$x" "$glibcxx_max"; }; then
            echo "gpu-check: $(basename "$f") needs GLIBC_${g:-none} GLIBCXX_${x:-none}, above" \
                "GLIBC_$glibc_max GLIBCXX_$glibcxx_max:" >&2
            objdump -T "$f" | awk '/\*UND\*/ {v = $(NF-1); gsub(/[()]/, "", v); print v, $NF}' |
                while read -r v sym; do
                    case $v in
                    GLIBC_[0-9]*) ver_le "${v#GLIBC_}" "$glibc_max" || echo "    $sym@$v" ;;
                    GLIBCXX_[0-9]*) ver_le "${v#GLIBCXX_}" "$glibcxx_max" || echo "    $sym@$v" ;;
                    esac
                done | sort -u | head -20 >&2
            bad=1
        fi
    done
    return $bad
}

# the sonames the programs load at run time, as compiled into tpd-worker
runtime_sonames() {
    grep -aoE 'lib(cublas|nccl)\.so\.[0-9]+' "$1" 2>/dev/null | sort -u | paste -sd' '
}

bundle() {
    local dir=$1 with_cuda=$2 src=${TP_BUILD_DIR:-build}/bin lib n=0 skipped=()
    [ -x "$src/tpd" ] || { echo "gpu-check: $src/tpd is missing: run scripts/build.sh" >&2; return 1; }
    [ -x "$src/tp_gpu_probe" ] || {
        echo "gpu-check: $src/tp_gpu_probe is missing: this build has no CUDA backend" >&2; return 1; }
    rm -rf "$dir" "$dir.tar.gz"
    mkdir -p "$dir/bin" "$dir/lib"
    for p in "${progs[@]}"; do
        cp "$src/$p" "$dir/bin/"
    done
    for lib in $(for p in "${progs[@]}"; do ldd "$src/$p"; done |
        awk '$2 == "=>" && $3 ~ /^\// {print $3}' | sort -u); do
        host_lib "$lib" && continue
        if cuda_lib "$lib" && [ "$with_cuda" = 0 ]; then
            skipped+=("$(basename "$lib")")
            continue
        fi
        cp -L "$lib" "$dir/lib/$(basename "$lib")"
        n=$((n + 1))
    done
    [ "$with_cuda" = 1 ] && for s in $(runtime_sonames "$dir/bin/tpd-worker"); do
        lib=$(ldconfig -p | awk -v s="$s" '$1 == s && !n++ {print $NF}')
        [ -n "$lib" ] && cp -L "$lib" "$dir/lib/$s" && [ "${s#libcublas}" != "$s" ] &&
            cp -L "$(dirname "$lib")/libcublasLt.so.${s##*.so.}" "$dir/lib/"
    done
    check_symbols "$dir" || echo "gpu-check: WARNING: the bundle needs a newer C/C++ runtime than" \
        "glibc $glibc_max / GLIBCXX_$glibcxx_max (see above)" >&2
    {
        echo "built: $(date -u +%Y-%m-%dT%H:%MZ) on $(. /etc/os-release 2>/dev/null; echo "${PRETTY_NAME:-?}"), $(getconf GNU_LIBC_VERSION)"
        echo "commit: $(git describe --always --dirty 2>/dev/null || echo unknown)"
        echo "cuda: $( (/usr/local/cuda/bin/nvcc --version || nvcc --version) 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
        echo "loads: $(runtime_sonames "$dir/bin/tpd-worker")"
        echo "needs: glibc $floor_glibc, GLIBCXX_$floor_glibcxx"
    } >"$dir/MANIFEST"
    tar -C "$(dirname "$dir")" -czf "$dir.tar.gz" "$(basename "$dir")"
    echo "bundled ${#progs[@]} programs and $n libraries into $dir ($(du -sh "$dir" | cut -f1))" \
        "and $dir.tar.gz ($(du -sh "$dir.tar.gz" | cut -f1)); needs glibc $floor_glibc," \
        "GLIBCXX_$floor_glibcxx; left to the host: ${skipped[*]:-nothing else}"
}

# find_cuda_libs SONAME...: for each, every directory that holds it, in the order searched; sets
# chosen[SONAME] to the first (for libcublas.so.N, the first that also holds libcublasLt.so.N)
find_cuda_libs() {
    local dirs=() d s py sp seen=" "
    IFS=: read -ra d <<<"${TPD_CUDA_LIBS:-}"
    dirs+=("${d[@]}")
    for d in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda-*/lib64 /usr/local/cuda-*/lib \
        /usr/local/cuda*/targets/*/lib; do
        dirs+=("$d")
    done
    for s in "$@" libcublasLt.so.${cublas_major:-13}; do
        while read -r d; do dirs+=("$(dirname "$d")"); done < <(ldconfig -p 2>/dev/null |
            awk -v s="$s" '$1 == s {print $NF}')
    done
    for py in ${TP_TORCH_PYTHON:-} /opt/*/.venv/bin/python /opt/*/bin/python3 /usr/local/bin/python3 \
        /usr/bin/python3 "$(command -v python3)"; do
        [ -x "$py" ] || continue
        for sp in $("$py" -c 'import site; print("\n".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null); do
            for d in "$sp"/nvidia/*/lib; do dirs+=("$d"); done
        done
    done
    for d in "${dirs[@]}"; do
        [ -d "$d" ] || continue
        d=$(cd "$d" && pwd -P)
        [[ "$seen" == *" $d "* ]] && continue
        seen+="$d "
        for s in "$@"; do
            [ -e "$d/$s" ] || continue
            found[$s]="${found[$s]:-}${found[$s]:+ }$d"
            if [ -z "${chosen[$s]:-}" ]; then
                case $s in
                libcublas.so.*) [ -e "$d/libcublasLt.so.${s##*.so.}" ] && chosen[$s]=$d ;;
                *) chosen[$s]=$d ;;
                esac
            fi
        done
    done
}

# print_cuda_libs SONAME...: one line each, what was chosen and what else exists
print_cuda_libs() {
    local s d others
    for s in "$@"; do
        others=
        for d in ${found[$s]:-}; do
            [ "$d" != "${chosen[$s]:-}" ] && others+=" $d"
        done
        if [ -n "${chosen[$s]:-}" ]; then
            printf "  %-20s %s%s\n" "$s" "${chosen[$s]}" "${others:+ (also in:$others)}"
        else
            printf "  %-20s MISSING: not in \$TPD_CUDA_LIBS, /usr/local/cuda*, ldconfig -p or any site-packages/nvidia/*/lib\n" "$s"
        fi
    done
}

# the layer of the forward timings: n x n F32 weights and a bias, uniform in +-1/64
layer_script() {
    cat <<'EOF'
import array, json, random, struct, sys
n = int(sys.argv[2])
rng = random.Random(1)
block = array.array("f", (rng.uniform(-1 / 64, 1 / 64) for _ in range(min(1 << 20, n * n))))
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
}

# the MLP block of the block timings: a Llama checkpoint directory holding model.layers.0.mlp's
# gate_proj, up_proj [inter, hidden] and down_proj [hidden, inter], F32 uniform in +-1/64
block_script() {
    cat <<'EOF'
import array, json, os, random, struct, sys
d, hidden, inter = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(2)
block = array.array("f", (rng.uniform(-1 / 64, 1 / 64) for _ in range(1 << 16)))
names = ["gate_proj", "up_proj", "down_proj"]
n = hidden * inter
hdr, off = {}, 0
for name, shape in zip(names, ([inter, hidden], [inter, hidden], [hidden, inter])):
    hdr["model.layers.0.mlp.%s.weight" % name] = {"dtype": "F32", "shape": shape,
                                                  "data_offsets": [off, off + 4 * n]}
    off += 4 * n
text = json.dumps(hdr).encode()
text += b" " * (-len(text) % 8)
os.makedirs(d, exist_ok=True)
with open(os.path.join(d, "model.safetensors"), "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text)
    for _ in names:
        for i in range(0, n, len(block)):
            block[:min(len(block), n - i)].tofile(f)
with open(os.path.join(d, "config.json"), "w") as f:
    json.dump({"model_type": "llama", "hidden_act": "silu"}, f)
EOF
}

# PyTorch's matmul at n^3 in FP32, TF32 and BF16, timed like gemm_cublas (CUDA events, 3
# warm-ups, then iters): the same GPU's ceiling by another caller of cuBLAS
torch_script() {
    cat <<'EOF'
import sys
import torch
n, iters = int(sys.argv[1]), int(sys.argv[2])
dev = torch.device("cuda", 0)
print("torch %s, CUDA %s, on %s" % (torch.__version__, torch.version.cuda,
                                    torch.cuda.get_device_name(dev)))
gen = torch.Generator(device=dev).manual_seed(1)
a32 = torch.rand(n, n, device=dev, generator=gen) - 0.5
b32 = torch.rand(n, n, device=dev, generator=gen) - 0.5
torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
for name in ("fp32", "tf32", "bf16"):
    torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
    a, b = (a32, b32) if name != "bf16" else (a32.bfloat16(), b32.bfloat16())
    c = torch.empty(n, n, device=dev, dtype=a.dtype)
    for _ in range(3):
        torch.matmul(a, b, out=c)
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(iters):
        torch.matmul(a, b, out=c)
    t1.record()
    t1.synchronize()
    ms = t0.elapsed_time(t1) / iters
    print("torch %s %dx%dx%d: %.1f TFLOP/s (%.3f ms per matmul)" % (name, n, n, n,
          2.0 * n ** 3 / (ms * 1e-3) * 1e-12, ms))
with open("/proc/self/maps") as f:
    libs = sorted({l.split()[-1] for l in f if "libcublas" in l})
print("torch's cuBLAS: " + " ".join(libs))
EOF
}

# start_tpd LOG ARGS...: starts tpd on $sock with ARGS, waits until it answers health (at most
# 60 s); 0 when ready, else 1 with the log's tail printed
tp_pid=
start_tpd() {
    local log=$1 i
    shift
    "$bin/tpd" --listen "$sock" --metrics-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 "$@" 2>"$log" &
    tp_pid=$!
    for i in $(seq 300); do
        "$bin/tpclient" --server "$sock" health >/dev/null 2>&1 && return 0
        kill -0 "$tp_pid" 2>/dev/null || break
        sleep 0.2
    done
    echo "gpu-check: tpd $* did not become ready:" >&2
    tail -5 "$log" >&2
    stop_tpd KILL
    return 1
}
stop_tpd() {
    [ -n "$tp_pid" ] || return 0
    kill -"${1:-TERM}" "$tp_pid" 2>/dev/null
    wait "$tp_pid" 2>/dev/null
    tp_pid=
}

# bench ROWS ITERS [WARMUP]: "p50 (p99)" in ms of tpclient bench, or "failed"
bench() {
    local out p
    out=$(timeout 60 "$bin/tpclient" --server "$sock" bench --rows "$1" --iters "$2" \
        --warmup "${3:-5}" 2>&1)
    p=$(echo "$out" | sed -n 's/.*p50 \([0-9.]*\).*p99 \([0-9.]*\).*/\1 (\2)/p')
    [ -n "$p" ] || { echo "$out" | tail -3 >&2; p=failed; }
    echo "$p"
}

# the worker's start line, shortened for the table: "pinned, poll sleep 21 us"
start_line() {
    sed -n 's/.*rank 0: notice: cuda backend on GPU [0-9]*: .*, arena \([a-z]*\), poll sleep \([0-9]*\) us,.*/\1, sleep \2 us/p' "$1" | head -1
}

# the table that ends the check (and the dry run, which renders it with what it ran)
summary() {
    local name m c t cfg mode gpus
    echo
    echo "== GPU check summary: $ngpus GPU(s), gpu 0: $gpu_name; $(($(date +%s) - start)) s of $budget"
    echo "host: $os, glibc $host_glibc${need_glibc:+ (bundle needs $need_glibc)}, memlock $(ulimit -l);" \
        "cuBLAS from ${chosen[$cublas_so]:-MISSING}, NCCL from ${chosen[$nccl_so]:-MISSING}"
    if want tests; then
        for name in cli forward uneven hf blocks invariance; do
            printf "  tests %-11s %-18s %4s s\n" "$name" "${result[$name]:-not run}" "${took[$name]:-}"
        done
        [ -n "$invariance" ] && echo "$invariance"
    fi
    if want gemm; then
        printf "%-6s %-22s %-22s %s\n" "4096^3" "cuBLAS TFLOP/s" "torch.matmul TFLOP/s" "cuBLAS/torch"
        for m in fp32 tf32 bf16; do
            c=$(tflops "$gemm" gemm "$m") t=$(tflops "$torch_out" torch "$m")
            printf "%-6s %-22s %-22s %s\n" "$m" "${c:-failed}" "${t:--}" \
                "$([ -n "$c" ] && [ -n "$t" ] && awk -v c="$c" -v t="$t" 'BEGIN {printf "%.2f", c / t}')"
        done
        # one worker job's parts, timed alone: what overlapping the next job's input copy with
        # this job's GEMM and output copy could save (docs/cuda.md, "One job at a time")
        echo "$gemm" | grep "^job " || echo "job parts: not measured"
    fi
    if [ "${#configs[@]}" -gt 0 ]; then
        echo "tpd forward, $forward_what, p50 ms (p99), tpclient bench over a unix socket:"
        printf "%-7s %-12s %-22s %-15s %-15s %-15s %s\n" gather gpus "rank 0" "batch 1" "batch 64" \
            "batch 1024" "first 1024"
        for cfg in "${configs[@]}"; do
            read -r mode gpus <<<"$cfg"
            printf "%-7s %-12s %-22s %-15s %-15s %-15s %s\n" "$mode" "$gpus" "${where["$cfg"]:-}" \
                "${lat["$cfg 1"]:-}" "${lat["$cfg 64"]:-}" "${lat["$cfg 1024"]:-}" \
                "${lat["$cfg first"]:-}"
        done
    fi
    if [ "${#block_configs[@]}" -gt 0 ]; then
        echo "tpd MLP block, $block_what, p50 ms (p99), tpclient bench over a unix socket:"
        printf "%-10s %-12s %-15s %-15s\n" all-reduce gpus "batch 1" "batch 64"
        for cfg in "${block_configs[@]}"; do
            read -r mode gpus <<<"$cfg"
            printf "%-10s %-12s %-15s %-15s\n" "$mode" "$gpus" "${blat["$cfg 1"]:-}" \
                "${blat["$cfg 64"]:-}"
        done
    fi
    echo "result: $([ "$status" = 0 ] && echo "every check passed" || echo "FAILED (see above)")"
}

# --- the bundle ---------------------------------------------------------------------------------

case "${1:-}" in
--bundle)
    dir=${2:-build/gpu-bundle}
    with_cuda=0
    [ "${3:-}" = "--with-cuda-libs" ] && with_cuda=1
    bundle "$dir" "$with_cuda"
    exit $?
    ;;
--dry-run) mode=dry ;;
"") mode=gpu ;;
*)
    echo "usage: $0 [--bundle [DIR [--with-cuda-libs]] | --dry-run [BUNDLE]]" >&2
    exit 64
    ;;
esac

start=$(date +%s)
budget=${TP_CHECK_BUDGET:-360}
parts=" ${TP_CHECK_PARTS:-tests gemm forward} "
want() { [[ "$parts" == *" $1 "* ]]; }
left() { echo $((budget - ($(date +%s) - start))); }
work=$(mktemp -d)
sock="unix:$work/tpd.sock"
unpack=
cleanup() {
    stop_tpd KILL
    rm -rf "$work" ${unpack:+"$unpack"}
}
trap cleanup EXIT
status=0
py=$(command -v python3 || command -v python)

# --- the programs -------------------------------------------------------------------------------
bundle_dir=
if [ "$mode" = dry ]; then
    b=${2:-}
    if [ -z "$b" ]; then
        if [ -f build/gpu-bundle.tar.gz ]; then
            b=build/gpu-bundle.tar.gz
        else
            echo "== no bundle given or in build/: making one from ${TP_BUILD_DIR:-build}"
            bundle "$work/gpu-bundle" 0 || exit 1
            b=$work/gpu-bundle
        fi
    fi
    if [ -f "$b" ]; then
        unpack=$(mktemp -d)
        tar -C "$unpack" -xzf "$b" || { echo "gpu-check: cannot unpack $b" >&2; exit 1; }
        bundle_dir=$(echo "$unpack"/*)
        tarball=$b
    else
        bundle_dir=$(cd "$b" && pwd)
        tarball=$b.tar.gz
    fi
    bin=$bundle_dir/bin
elif [ -n "${TP_BIN:-}" ]; then
    bin=$TP_BIN
elif [ -x build/gpu-bundle/bin/tpd ]; then
    bundle_dir=$root/build/gpu-bundle
elif [ -f build/gpu-bundle.tar.gz ]; then
    unpack=$(mktemp -d)
    tar -C "$unpack" -xzf build/gpu-bundle.tar.gz
    bundle_dir=$unpack/gpu-bundle
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
[ -n "$bundle_dir" ] && bin=$bundle_dir/bin
manifest=${bundle_dir:+$bundle_dir/MANIFEST}
sonames=$(sed -n 's/^loads: //p' "${manifest:-/dev/null}" 2>/dev/null)
[ -n "$sonames" ] || sonames=$(runtime_sonames "$bin/tpd-worker")
[ -n "$sonames" ] || sonames="libcublas.so.13 libnccl.so.2"
cublas_so=$(echo "$sonames" | grep -o 'libcublas\.so\.[0-9]*')
nccl_so=$(echo "$sonames" | grep -o 'libnccl\.so\.[0-9]*')
cublas_major=${cublas_so##*.so.}
wanted=("$cublas_so" "libcublasLt.so.$cublas_major" "$nccl_so" "libcudart.so.$cublas_major")

# --- the environment ----------------------------------------------------------------------------
echo "== environment"
os=$(. /etc/os-release 2>/dev/null; echo "${PRETTY_NAME:-unknown}")
host_glibc=$(getconf GNU_LIBC_VERSION | awk '{print $2}')
stdcxx=$(ldconfig -p 2>/dev/null | awk '$1 == "libstdc++.so.6" && /x86-64|64bit/ && !n++ {print $NF}')
host_glibcxx=$(grep -aoE 'GLIBCXX_3\.4\.[0-9]+' "${stdcxx:-/dev/null}" 2>/dev/null | sed 's/GLIBCXX_//' |
    sort -uV | tail -1)
echo "host: $(uname -srm); $os; $(nproc) cpus; $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)" \
    "memory; memlock limit $(ulimit -l)"
echo "C/C++ runtime: glibc $host_glibc; libstdc++ ${stdcxx:-not found} (up to GLIBCXX_${host_glibcxx:-?})"
echo "python3: ${py:-none} $("$py" --version 2>&1 | cut -d' ' -f2)"
echo "nvcc: $( (nvcc --version || /usr/local/cuda/bin/nvcc --version) 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p' | head -1)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,driver_version,memory.total \
    --format=csv,noheader | sed 's/^/gpu: /'
echo "programs: $bin${manifest:+ (bundle: $(tr '\n' ';' <"$manifest" | sed 's/;$//; s/;/; /g'))}"
need_glibc=$(sed -n 's/^needs: glibc \([0-9.]*\),.*/\1/p' "${manifest:-/dev/null}" 2>/dev/null)
need_glibcxx=$(sed -n 's/^needs: .*GLIBCXX_\([0-9.]*\).*/\1/p' "${manifest:-/dev/null}" 2>/dev/null)
if [ -n "$need_glibc" ] && ! ver_le "$need_glibc" "$host_glibc"; then
    echo "gpu-check: FAILED: the bundle needs glibc $need_glibc, this host has $host_glibc" >&2
    exit 1
fi
if [ -n "$need_glibcxx" ] && [ -n "$host_glibcxx" ] && ! ver_le "$need_glibcxx" "$host_glibcxx"; then
    echo "gpu-check: FAILED: the bundle needs GLIBCXX_$need_glibcxx, $stdcxx has $host_glibcxx" >&2
    exit 1
fi
find_cuda_libs "${wanted[@]}"
echo "CUDA libraries (the programs load $cublas_so and $nccl_so; they link the CUDA runtime statically):"
print_cuda_libs "${wanted[@]}"
cuda_dirs=
for s in "$cublas_so" "$nccl_so"; do
    d=${chosen[$s]:-}
    [ -n "$d" ] && [[ ":$cuda_dirs:" != *":$d:"* ]] && cuda_dirs=${cuda_dirs:+$cuda_dirs:}$d
done
export TPD_CUDA_LIBS=$cuda_dirs
echo "TPD_CUDA_LIBS=$TPD_CUDA_LIBS"
torch_py=
for p in ${TP_TORCH_PYTHON:-} /opt/torch/.venv/bin/python /opt/*/.venv/bin/python "$py"; do
    [ -x "$p" ] && "$p" -c 'import torch' 2>/dev/null && { torch_py=$p; break; }
done
echo "torch: ${torch_py:-not found} $([ -n "$torch_py" ] && "$torch_py" -c 'import torch; print(torch.__version__)' 2>/dev/null)"

missing=0
for p in "${progs[@]}"; do
    [ -x "$bin/$p" ] || { echo "gpu-check: $bin/$p is missing (a build without CUDA?)" >&2; missing=1; continue; }
    [ "$p" = gemm_cublas ] && continue # it links cuBLAS: checked where it runs
    if ldd "$bin/$p" | grep -q "not found"; then
        echo "gpu-check: $p cannot load:" >&2
        ldd "$bin/$p" | grep "not found" >&2
        missing=1
    fi
done
[ "$missing" = 0 ] || { echo "gpu-check: missing programs or libraries, see above" >&2; exit 1; }

# --- the dry run: everything that needs no GPU --------------------------------------------------
if [ "$mode" = dry ]; then
    fail() { echo "gpu-check --dry-run: FAILED: $*" >&2; status=1; }
    echo "== the script and its python"
    bash -n "$0" || fail "bash -n $0"
    layer_script >"$work/layer.py"
    block_script >"$work/block.py"
    torch_script >"$work/torch_matmul.py"
    PYTHONPYCACHEPREFIX=$work/pycache "$py" -m py_compile "$work/layer.py" "$work/torch_matmul.py" \
        "$work/block.py" \
        tests/gpu/*.py scripts/make_layer.py || fail "python syntax"
    echo "== the bundle: $bundle_dir"
    [ -s "$manifest" ] || fail "no MANIFEST in the bundle"
    check_symbols "$bundle_dir" || fail "a bundled file needs more than glibc $glibc_max or GLIBCXX_$glibcxx_max"
    echo "needs at most: glibc $floor_glibc, GLIBCXX_$floor_glibcxx (limits $glibc_max, $glibcxx_max)"
    for p in "${progs[@]}"; do
        # every library that is not the host's must come from the bundle, by the RPATH alone
        out=$(env -u LD_LIBRARY_PATH ldd "$bin/$p")
        while read -r name path; do
            host_lib "$name" && continue
            cuda_lib "$name" && [ "$p" = gemm_cublas ] && continue
            path=$(realpath -m -s "$path")
            case "$path" in
            "$bundle_dir"/lib/*) ;;
            *) fail "$p loads $name from $path, not from the bundle" ;;
            esac
        done < <(echo "$out" | awk '$2 == "=>" {print $1, $3}')
        echo "$out" | grep -q "not found" && [ "$p" != gemm_cublas ] && fail "$p: $(echo "$out" | grep "not found")"
    done
    for p in tpd tpd-worker tpclient tp_gpu_probe; do
        ldd "$bin/$p" | grep -qE 'libcublas|libnccl|libcudart' &&
            fail "$p links a CUDA library: it must load cuBLAS and NCCL at run time"
    done
    [ -f "$tarball" ] && size=$(du -m "$tarball" | cut -f1) && echo "tarball: $tarball, $size MiB" &&
        [ "$size" -gt "$carry_max_mib" ] && fail "$tarball is $size MiB, more than $carry_max_mib"
    echo "== the GPU probe (no GPU expected here)"
    probe=$("$bin/tp_gpu_probe")
    echo "$probe"
    echo "$probe" | grep -q "^no usable GPU: " || echo "gpu-check: a GPU is visible: run without --dry-run"
    echo "== the bundle's programs on the CPU"
    "$py" "$work/layer.py" "$work/layer.safetensors" 256 || fail "the layer generator"
    if start_tpd "$work/cpu.log" --weights "$work/layer.safetensors" --cpu 2 --max-batch 64; then
        r=$(bench 64 1 0)
        lat["cpu 2 first"]=${r% (*}
        [ "$r" = failed ] && fail "tpclient bench --iters 1 --warmup 0"
        for rows in 1 64; do
            r=$(bench "$rows" 20)
            echo "--cpu 2, batch $rows: p50 (p99) ms $r"
            lat["cpu 2 $rows"]=$r
            [ "$r" = failed ] && fail "tpclient bench --rows $rows"
        done
        stop_tpd
    else
        fail "the bundle's tpd did not serve on the CPU"
    fi
    for g in host nccl; do
        echo "$probe" | grep -q "^no usable GPU: " || break
        out=$(timeout 60 "$bin/tpd" --listen "$sock" --metrics-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --weights \
            "$work/layer.safetensors" --gpus 0 --gather "$g" 2>&1)
        rc=$?
        echo "--gpus 0 --gather $g: exit $rc: $(echo "$out" | tail -1)"
        # without NCCL on this machine, tpd says so before any worker starts
        [ "$rc" = 1 ] && echo "$out" | tail -1 | grep -qE "rank 0: no usable GPU: |making the NCCL id: .*libnccl" ||
            fail "tpd --gpus 0 --gather $g without a GPU must exit 1 with the worker's reason"
    done
    "$py" "$work/block.py" "$work/block" 256 688 || fail "the block generator"
    if start_tpd "$work/cpu-block.log" --weights "$work/block" --block model.layers.0.mlp \
        --cpu 2 --max-batch 64; then
        for rows in 1 64; do
            r=$(bench "$rows" 20)
            echo "--cpu 2 --block, batch $rows: p50 (p99) ms $r"
            blat["cpu 2 $rows"]=$r
            [ "$r" = failed ] && fail "tpclient bench --rows $rows of the block"
        done
        stop_tpd
    else
        fail "the bundle's tpd did not serve the block on the CPU"
    fi
    echo "== the time limits"
    plan=$((env_s + tests_s + gemm_s + forward_s + block_s))
    echo "planned: environment $env_s s, tests $tests_s s, GEMMs $gemm_s s, forwards $forward_s s, blocks $block_s s: $plan of $budget s"
    [ "$plan" -le "$budget" ] || fail "the parts' limits add up to $plan s, over the budget of $budget s"
    # the table of the check, with what the dry run ran in place of the GPU's parts
    ngpus=0 gpu_name="none (dry run)" configs=("cpu 2") block_configs=("cpu 2") parts=" forward "
    forward_what="in = out = 256 on the cpu backend (the dry run)"
    block_what="hidden 256, intermediate 688 on the cpu backend (the dry run)"
    summary
    exit $status
fi

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
[ -n "${chosen[$cublas_so]:-}" ] || {
    echo "gpu-check: FAILED: $cublas_so was not found (see above): set TPD_CUDA_LIBS" >&2; exit 1; }
ngpus=$(echo "$probe" | sed -n 's/^gpus: //p')
gpu_name=$(echo "$probe" | sed -n 's/^gpu 0: //p')
export TPD=$bin/tpd TPCLIENT=$bin/tpclient TP_GPU_PROBE=$bin/tp_gpu_probe PYTHONDONTWRITEBYTECODE=1

# --- the gpu tests, in parallel: each starts its own daemons on its own sockets ----------------
if want tests; then
    limit=$(($(left) - gemm_s - forward_s - block_s))
    [ "$limit" -gt "$tests_s" ] && limit=$tests_s
    [ "$limit" -lt 30 ] && limit=30
    echo "== gpu tests, all at once, each at most $limit s"
    jobs=("cli test_gpu_cli" "forward test_gpu_forward TestGpuForward TestGpuGuards"
        "uneven test_gpu_forward TestGpuUnevenSplit" "hf test_gpu_forward TestGpuHuggingFace"
        "blocks test_gpu_forward TestGpuBlocks TestGpuRepository" "invariance test_gpu_invariance")
    for j in "${jobs[@]}"; do
        read -r name script args <<<"$j"
        (
            t0=$(date +%s)
            # shellcheck disable=SC2086
            timeout -k 10 "$limit" "$py" "tests/gpu/$script.py" $args >"$work/$name.out" 2>&1
            echo "$? $(($(date +%s) - t0))" >"$work/$name.rc"
        ) &
    done
    wait
    for j in "${jobs[@]}"; do
        read -r name script args <<<"$j"
        read -r rc secs <"$work/$name.rc"
        echo "== $script $args: exit $rc in $secs s"
        if [ "$rc" = 0 ] || [ "$rc" = 77 ]; then cat "$work/$name.out"; else tail -80 "$work/$name.out"; fi
        took[$name]=$secs
        case $rc in
        0) result[$name]=ok ;; 77) result[$name]=skipped ;; 124 | 137) result[$name]="TIMED OUT"; status=1 ;;
        *) result[$name]="FAILED (exit $rc)"; status=1 ;;
        esac
    done
    invariance=$(grep "^batch invariance" "$work/invariance.out")
fi

# --- GEMMs: cuBLAS through gemm_cublas and through torch.matmul ---------------------------------
if want gemm; then
    echo "== GEMM 4096^3"
    # gemm_cublas links cuBLAS: the directory found above, for this one program
    gemm=$(LD_LIBRARY_PATH=${chosen[$cublas_so]} timeout 30 "$bin/gemm_cublas" --n 4096 --iters 20) || status=1
    echo "$gemm"
    echo "gemm_cublas loads: $(LD_LIBRARY_PATH=${chosen[$cublas_so]} ldd "$bin/gemm_cublas" | awk '/libcublas/ {print $3}' | tr '\n' ' ')"
    if [ -n "$torch_py" ]; then
        torch_script >"$work/torch_matmul.py"
        # the host's own environment: no LD_LIBRARY_PATH of ours shadows torch's libraries
        torch_out=$(timeout $((gemm_s - 30)) "$torch_py" "$work/torch_matmul.py" 4096 20 2>&1) || status=1
        echo "$torch_out"
    else
        echo "gpu-check: no python with torch: the torch.matmul column stays empty"
    fi
fi
tflops() { echo "$1" | sed -n "s/^$2 $3 [0-9x]*: \([0-9.]*\) TFLOP.*/\1/p"; }

# --- end-to-end forwards ------------------------------------------------------------------------
if want forward; then
    echo "== forward latency, in = out = 4096"
    layer_script >"$work/layer.py"
    "$py" "$work/layer.py" "$work/layer.safetensors" 4096
    if [ "$ngpus" -ge 2 ]; then
        all=$(seq -s, 0 $((ngpus > 8 ? 7 : ngpus - 1)))
        configs=("nccl $all" "host $all")
    else
        # 0,0,0: an uneven split of 4096 (1366, 1365, 1365)
        configs=("nccl 0" "host 0" "host 0,0" "host 0,0,0")
    fi
    [ -n "${chosen[$nccl_so]:-}" ] || echo "gpu-check: $nccl_so was not found: --gather nccl will fail"
fi
for cfg in "${configs[@]}"; do
    read -r mode gpus <<<"$cfg"
    [ "$(left)" -gt 20 ] || { echo "gpu-check: out of time, skipping $cfg"; status=1; continue; }
    start_tpd "$work/tpd-$mode-$gpus.log" --weights "$work/layer.safetensors" --gpus "$gpus" \
        --gather "$mode" --max-batch 1024 --log-level notice || { status=1; continue; }
    where["$cfg"]=$(start_line "$work/tpd-$mode-$gpus.log")
    grep -hE "notice: (cuBLAS|NCCL) [0-9]" "$work/tpd-$mode-$gpus.log" | sort -u | head -2
    # the first request after the start, cold: the warm-up must have paid every lazy set-up
    r=$(bench 1024 1 0)
    echo "--gather $mode --gpus $gpus, the first request, 1024 rows: ms ${r% (*}"
    lat["$cfg first"]=${r% (*}
    for rows in 1 64 1024; do
        r=$(bench "$rows" "$([ "$rows" = 1024 ] && echo 30 || echo 200)")
        echo "--gather $mode --gpus $gpus, batch $rows: p50 (p99) ms $r"
        lat["$cfg $rows"]=$r
        [ "$r" = failed ] && status=1
    done
    stop_tpd
done

# --- the MLP block -------------------------------------------------------------------------------
if want forward; then
    echo "== MLP block latency, $block_what"
    if [ "$(left)" -gt 25 ]; then
        block_script >"$work/block.py"
        "$py" "$work/block.py" "$work/block" 4096 11008 || status=1
        if [ "$ngpus" -ge 2 ]; then
            block_configs=("nccl $all" "host $all")
        else
            block_configs=("nccl 0" "host 0,0")
        fi
    else
        echo "gpu-check: out of time, skipping the block"
        status=1
    fi
fi
for cfg in "${block_configs[@]}"; do
    read -r mode gpus <<<"$cfg"
    [ "$(left)" -gt 10 ] || { echo "gpu-check: out of time, skipping the block on $cfg"; status=1; continue; }
    start_tpd "$work/tpd-block-$mode-$gpus.log" --weights "$work/block" \
        --block model.layers.0.mlp --gpus "$gpus" --gather "$mode" --max-batch 64 \
        --log-level notice || { status=1; continue; }
    for rows in 1 64; do
        r=$(bench "$rows" 50)
        echo "--block --gather $mode --gpus $gpus, batch $rows: p50 (p99) ms $r"
        blat["$cfg $rows"]=$r
        [ "$r" = failed ] && status=1
    done
    stop_tpd
done

summary
exit $status
