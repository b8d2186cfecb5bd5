#!/usr/bin/env bash
# test_gpu_bundle.sh -- the bundle that `bench/gpu-check.sh --bundle` packs for GPU machines must
# load on a host older than this one. Checked here with objdump, independently of the script's
# own check:
#
#   * no bundled file (program or library) needs a glibc symbol newer than GLIBC_2.34 or a
#     libstdc++ one newer than GLIBCXX_3.4.29 (the highest of each is printed per file); and the
#     check can fail: this machine's own libstdc++ (GLIBC_2.36 here) must fail it;
#   * the host's C/C++ runtime, driver and CUDA libraries are not in the bundle;
#   * every other library a program needs resolves inside the bundle through the programs' RPATH
#     alone (ldd without LD_LIBRARY_PATH);
#   * tpd, tpd-worker, tpclient and tp_gpu_probe need no CUDA library to start (they load cuBLAS
#     and NCCL with dlopen, only when serving from GPUs);
#   * the tarball stays under 48 MiB (what may be carried to a GPU machine is 64 MiB in all).
#
#   test_gpu_bundle.sh BUILD_DIR
set -euo pipefail
build=$(realpath "$1")
root=$(cd "$(dirname "$0")/../.." && pwd)
glibc_max=2.34 glibcxx_max=3.4.29 tar_max_mib=48
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "test_gpu_bundle: FAILED: $*" >&2; exit 1; }

command -v objdump >/dev/null || fail "objdump is not installed (Debian package binutils)"
TP_BUILD_DIR=$build "$root/bench/gpu-check.sh" --bundle "$tmp/gpu-bundle" >"$tmp/log" 2>&1 ||
    { cat "$tmp/log" >&2; fail "bench/gpu-check.sh --bundle"; }
cat "$tmp/log"
dir=$tmp/gpu-bundle

le() { [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -1)" = "$1" ]; }
# highest FILE PREFIX: the highest PREFIX_ version among FILE's undefined (needed) symbols
highest() {
    objdump -T "$1" | awk '/\*UND\*/' | grep -oE "$2_[0-9][0-9.]*" | sed "s/^$2_//" | sort -uV |
        tail -1
}
# within FILE: 0 when FILE needs at most the limits, else 1 (printing what is above)
within() {
    local g x
    g=$(highest "$1" GLIBC) x=$(highest "$1" GLIBCXX)
    printf "  %-56s GLIBC_%-8s GLIBCXX_%s\n" "$(basename "$1")" "${g:--}" "${x:--}"
    { [ -z "$g" ] || le "$g" "$glibc_max"; } && { [ -z "$x" ] || le "$x" "$glibcxx_max"; }
}

echo "highest symbol versions needed (limits GLIBC_$glibc_max, GLIBCXX_$glibcxx_max):"
bad=0
n=0
for f in "$dir"/bin/* "$dir"/lib/*; do
    within "$f" || { echo "    ^ above the limits" >&2; bad=1; }
    n=$((n + 1))
done
[ "$bad" = 0 ] || fail "bundled files need a newer C/C++ runtime than glibc $glibc_max / GLIBCXX_$glibcxx_max"
[ "$n" -gt 10 ] || fail "only $n files in the bundle"

# the check above can fail: this machine's libstdc++ is newer than the limits
# (awk reads to the end: an early exit would kill ldconfig with SIGPIPE, and pipefail the script)
stdcxx=$(ldconfig -p | awk '$1 == "libstdc++.so.6" && /x86-64/ && !n++ {print $NF}')
[ -n "$stdcxx" ] || fail "no libstdc++.so.6 in ldconfig -p"
if within "$stdcxx" >/dev/null; then
    fail "$stdcxx passes the symbol check: the check cannot tell an old runtime from a new one"
fi

for lib in libc.so.6 libm.so.6 libpthread.so.0 libdl.so.2 libstdc++.so.6 libgcc_s.so.1 \
    libcuda.so.1 libcublas.so.13 libcublasLt.so.13 libnccl.so.2 libcudart.so.13; do
    [ ! -e "$dir/lib/$lib" ] || fail "$lib is bundled: it must come from the host"
done

for p in tpd tpd-worker tpclient tp_gpu_probe gemm_cublas; do
    [ -x "$dir/bin/$p" ] || fail "bin/$p is missing"
    readelf -d "$dir/bin/$p" | grep -q 'RPATH.*\[\$ORIGIN/\.\./lib\]' ||
        fail "bin/$p has no RPATH \$ORIGIN/../lib: $(readelf -d "$dir/bin/$p" | grep -E 'R(UN)?PATH')"
    while read -r name path; do
        case $name in
        libc.so.* | libm.so.* | libpthread.so.* | libdl.so.* | librt.so.* | libstdc++.so.* | \
            libgcc_s.so.* | libcublas*.so.* | libnccl.so.*) continue ;;
        esac
        [ "$(realpath -m -s "$path")" = "$dir/lib/$name" ] ||
            fail "bin/$p loads $name from $path, not from the bundle"
    done < <(env -u LD_LIBRARY_PATH ldd "$dir/bin/$p" | awk '$2 == "=>" {print $1, $3}')
done
for p in tpd tpd-worker tpclient tp_gpu_probe; do
    if readelf -d "$dir/bin/$p" | grep -E 'NEEDED.*lib(cublas|nccl|cudart|cuda)\.'; then
        fail "bin/$p needs a CUDA library at start"
    fi
done

size=$(du -m "$tmp/gpu-bundle.tar.gz" | cut -f1)
echo "tarball: $size MiB (at most $tar_max_mib)"
[ "$size" -le "$tar_max_mib" ] || fail "the tarball is $size MiB"
echo "test_gpu_bundle: ok"
