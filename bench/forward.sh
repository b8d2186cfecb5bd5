#!/usr/bin/env bash
# End-to-end forward latency through tpd against one in-process cblas_sgemm of the same shape on
# the same cores, in the same run:
#
#   bench/forward.sh [--rows 64] [--in 4096] [--out 4096] [--cpu 2] [--iters 50] [--rounds 3]
#
# Builds nothing: run scripts/build.sh first. Prints both medians and their ratio per round.
# Record OPENBLAS_CORETYPE with the numbers: it changes the GEMM kernel.
set -euo pipefail
cd "$(dirname "$0")/.."
rows=64 in=4096 out=4096 cpu=2 iters=50 rounds=3
while [ $# -gt 0 ]; do
    case "$1" in
    --rows) rows=$2 ;; --in) in=$2 ;; --out) out=$2 ;; --cpu) cpu=$2 ;;
    --iters) iters=$2 ;; --rounds) rounds=$2 ;;
    *) echo "usage: $0 [--rows B] [--in N] [--out M] [--cpu N] [--iters K] [--rounds R]" >&2
       exit 64 ;;
    esac
    shift 2
done
cores=$(nproc)
. scripts/lib.sh
echo "machine: $cores cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-unset}"
python3 scripts/make_layer.py --in "$in" --out "$out" --rows 1 "$tp_dir/layer"
tp_start --weights "$tp_dir/layer.safetensors" --cpu "$cpu" --max-batch "$rows" --log-level warn
sock=$tp_sock
# Baseline and tpd alternate, so that a noisy neighbour hits both alike.
for round in $(seq "$rounds"); do
    base=$(build/bin/gemm_baseline --rows "$rows" --in "$in" --out "$out" --threads "$cores" \
        --iters "$iters")
    fwd=$(build/bin/tpclient --server "$sock" bench --rows "$rows" --iters "$iters")
    b=$(echo "$base" | sed -n 's/.*median \([0-9.]*\) ms.*/\1/p')
    f=$(echo "$fwd" | sed -n 's/.*p50 \([0-9.]*\).*/\1/p')
    echo "round $round: in-process sgemm median $b ms; tpd forward p50 $f ms;" \
        "ratio $(python3 -c "print(f'{$f / $b:.2f}')")"
done
echo "last round in full:"
echo "$base"
echo "$fwd"
