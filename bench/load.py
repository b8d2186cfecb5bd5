#!/usr/bin/env python3
"""load.py -- how long tpd takes to load a large layer, against `cat` of the same bytes in the
same run.

    build/venv/bin/python bench/load.py [--ranks 1,2] [--rounds R] [--dir DIR] [--keep] ...

(after scripts/build.sh; it needs numpy, which scripts/venv.sh puts in build/venv).

It makes (once per size) a safetensors file holding one lm_head of 128256 x 4096 in BF16, 1 GiB:
random sign and mantissa bits, with the exponent held so that every magnitude is in
[2^-7, 2^-3): finite, so that the output check below means something. It is written in chunks,
header and all, without ever holding the layer in memory. Then, in every round:

  cat     the file is read once to warm the page cache, then `cat FILE > /dev/null` runs 3 times
          and the best counts: the baseline, one copy of every byte from the page cache into a
          small user buffer;
  tpd     for each --ranks N, tpd --cpu N starts on a unix socket in a temporary directory. It
          measures the wall time from spawn to tpd's `ready: serving` log line, and reads each
          worker's `loaded rows ... in S s` line: the time the worker spent reading its shard
          and widening it from BF16 to float32, and the bytes it read, which must be its shard.
          Then one 2-row request goes through `tpclient forward`, and 2 of its output columns are
          checked against a float64 reference computed from the file's own rows, so the numbers
          are those of a tpd that loaded the right weights. Then tpd gets SIGTERM and must exit 0.

It prints every measurement, a `load-result:` line of key=value per measurement, the table of
docs/performance.md ("Loading a layer"), with the ratios read / cat and ready / cat, and the
target: each worker's read within 1.5x of cat. It asserts nothing about speed.

For each worker it also reports its minor page faults, its peak resident memory and the
transparent huge pages it holds once tpd is ready (from /proc, while tpd still runs), and the
time between the last worker's `loaded` line and `ready`, which is mostly the invariant GEMM
packing W into panels. The machine's load average is printed before every round: other work on
the same cores shows up here first.

Where the memory comes from matters as much as the file. On a VM whose balloon reports free
pages to the host, memory freed by one start goes back to the host within seconds, and the next
start's first touch of each 4 KiB page waits for the host again, huge pages or not. So a start
that follows another one closely is faster than one after a pause. --warm-memory takes that out:
before each start it first touches and frees as much memory as the ranks will hold, so that
they get pages the host backs, as on a machine without a hypervisor. --pause S does the
opposite: it waits S seconds before each start, long enough for the host to take the memory
back, so that every start pays what a start after a long idle pays.
"""

import argparse
import glob
import json
import mmap
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from datetime import datetime

import numpy as np

from benchutil import cpu_model, stop_tpd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "lm_head.weight"
TARGET = 1.5  # worker read time / cat time
TOLERANCE = 1e-5  # max |y - ref| / (|x| . |w|) of a checked column: FP32 sums of BF16 weights
CHUNK_BYTES = 64 << 20  # bytes of random weights made and written at once
HUGE = 2 << 20  # bytes of a transparent huge page
TICK = os.sysconf("SC_CLK_TCK")  # units of the CPU times in /proc

LOADED_RE = re.compile(r"^(?:(\S+ \S+) )?tpd-worker rank (\d+): notice: loaded rows \[(\d+), "
                       r"(\d+)\) of (\d+) from '([^']*)' \((\w+)\): read (\d+) bytes of weight "
                       r"and (\d+) bytes of bias.* in ([0-9.]+) s")
STARTED_RE = re.compile(r"tpd: notice: started worker rank (\d+) pid (\d+)")
READY_RE = re.compile(r"^(?:(\S+ \S+) )?tpd: notice: ready: serving ", re.M)


class BenchError(Exception):
    pass


def log(*a):
    print(*a, flush=True)


def stamp(text):
    """Seconds since the epoch of a log line's 'YYYY-MM-DD HH:MM:SS.mmm', or None."""
    try:
        return datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f").timestamp()
    except (TypeError, ValueError):
        return None


# -- the layer ------------------------------------------------------------------------------------


def header_bytes(rows, cols):
    text = json.dumps({NAME: {"dtype": "BF16", "shape": [rows, cols],
                              "data_offsets": [0, rows * cols * 2]}}).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def make_layer(directory, rows, cols, seed):
    """The layer's path, and whether this call made it: a file of the right size already in
    directory is used as it is."""
    path = os.path.join(directory, "lm_head_%dx%d_bf16.safetensors" % (rows, cols))
    head = header_bytes(rows, cols)
    if os.path.isfile(path) and os.path.getsize(path) == len(head) + rows * cols * 2:
        with open(path, "rb") as f:
            if f.read(len(head)) == head:
                return path, False
    rng = np.random.default_rng(seed)
    step = max(1, CHUNK_BYTES // (2 * cols))
    part = path + ".part"  # renamed when complete, so that an interrupted run leaves no cache
    with open(part, "wb") as f:
        f.write(head)
        for r0 in range(0, rows, step):
            bits = rng.integers(0, 1 << 16, size=(min(step, rows - r0), cols), dtype="<u2")
            bits &= 0x81FF  # sign, the exponent's 2 low bits, the mantissa
            bits |= 0x3C00  # exponent 120..123
            f.write(bits.tobytes())
    os.replace(part, path)
    return path, True


def weight_rows(path, rows, cols, which):
    """Rows `which` of W, read from the file itself, as float64."""
    data = np.memmap(path, dtype="<u2", mode="r", offset=len(header_bytes(rows, cols)),
                     shape=(rows, cols))
    bits = np.asarray(data[list(which)]).astype(np.uint32) << 16
    del data
    return bits.view(np.float32).astype(np.float64)


# -- the baseline ---------------------------------------------------------------------------------


def warm(path):
    buf = bytearray(8 << 20)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def time_cat(path, times=3):
    out = []
    for _ in range(times):
        t0 = time.monotonic()
        p = subprocess.run(["cat", path], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        out.append(time.monotonic() - t0)
        if p.returncode != 0:
            raise BenchError("cat %s exited %d: %s" % (path, p.returncode, p.stderr.decode()))
    return out


def warm_memory(nbytes):
    """Touches nbytes of fresh anonymous memory, 4 KiB apart, then frees it: the seconds that
    took. On a VM that hands freed memory back to its host (virtio-balloon free page reporting),
    a process that allocates right afterwards gets pages the host still backs, as on a machine
    without a hypervisor; without this, its first touch of each page may wait for the host."""
    n = (nbytes + HUGE - 1) // HUGE * HUGE
    m = mmap.mmap(-1, n + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        a = np.frombuffer(m, dtype=np.uint8)
        off = -a.ctypes.data % HUGE
        m.madvise(mmap.MADV_HUGEPAGE, off, n)
        t0 = time.monotonic()
        a[off:off + n:4096] = 1
        secs = time.monotonic() - t0
        del a
    finally:
        m.close()
    return secs


def free_page_reporting():
    """'on' or 'off' when a virtio balloon says whether it reports free pages to the host (its
    feature bit 5), else None."""
    for d in glob.glob("/sys/bus/virtio/drivers/virtio_balloon/virtio*"):
        try:
            with open(os.path.join(d, "features")) as f:
                bits = f.read().strip()
        except OSError:
            continue
        return "on" if len(bits) > 5 and bits[5] == "1" else "off"
    return None


# -- tpd ------------------------------------------------------------------------------------------


def machine_cpu():
    """Seconds of CPU the whole machine has spent busy and stolen (by the hypervisor) so far."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / TICK, v[7] / TICK


def cpu_of(pid):
    """Seconds of CPU a live process has used (user and system), 0 if it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            v = f.read().rsplit(")", 1)[1].split()
        return (int(v[11]) + int(v[12])) / TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def proc_numbers(pid):
    """Minor faults, peak RSS bytes and AnonHugePages bytes of a live process, None if gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            minflt = int(f.read().rsplit(")", 1)[1].split()[7])
        hwm = huge = 0
        with open("/proc/%d/status" % pid) as f:
            for ln in f:
                if ln.startswith("VmHWM:"):
                    hwm = int(ln.split()[1]) << 10
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for ln in f:
                if ln.startswith("AnonHugePages:"):
                    huge = int(ln.split()[1]) << 10
        return minflt, hwm, huge
    except (OSError, IndexError, ValueError):
        return None


class Bench:
    def __init__(self, a, path):
        self.a = a
        self.path = path
        self.bin = os.path.join(os.path.abspath(a.build), "bin")
        for name in ("tpd", "tpd-worker", "tpclient"):
            if not os.access(os.path.join(self.bin, name), os.X_OK):
                raise BenchError("%s/%s is missing: build first (scripts/build.sh)" %
                                 (self.bin, name))
        self.tmp = tempfile.mkdtemp(prefix="tpload.")
        self.tpd = None
        self.starts = 0

    def stop(self):
        """SIGTERM to tpd; its exit status (it drains, stops its workers and exits 0)."""
        p, self.tpd = self.tpd, None
        return stop_tpd(p, BenchError)

    def measure(self, ranks):
        """Starts tpd --cpu ranks, times it to ready, checks one request, stops it."""
        self.starts += 1
        sock = os.path.join(self.tmp, "s.sock")
        log_path = os.path.join(self.tmp, "tpd%d.log" % self.starts)
        cmd = [os.path.join(self.bin, "tpd"), "--weights", self.path, "--weight", NAME, "--cpu",
               str(ranks), "--listen", "unix:" + sock, "--metrics-listen", "off", "--http-listen", "off", "--config",
               "none", "--max-batch", "4", "--slots", "1"]
        warmed = None
        if self.a.pause:
            time.sleep(self.a.pause)
        if self.a.warm_memory:
            # what the ranks hold at their peak: each its float32 shard and, while it packs, the
            # panels; and a little more for the rest of each process
            need = 2 * self.a.rows * self.a.cols * 4 + ranks * (256 << 20)
            warmed = (need, warm_memory(need))
        with open(log_path, "w") as f:
            busy0, steal0 = machine_cpu()
            self0 = sum(os.times()[:2])
            t0 = time.monotonic()
            self.tpd = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        text = ""
        deadline = t0 + self.a.timeout
        with open(log_path) as f:
            while True:
                text += f.read()
                ready_m = READY_RE.search(text)
                if ready_m:
                    ready = time.monotonic() - t0
                    break
                if self.tpd.poll() is not None:
                    raise BenchError("tpd exited %d before it was ready:\n%s" %
                                     (self.tpd.returncode, text[-3000:]))
                if time.monotonic() > deadline:
                    raise BenchError("tpd was not ready after %.0f s:\n%s" %
                                     (self.a.timeout, text[-3000:]))
                time.sleep(0.002)
        pids = {int(r): int(p) for r, p in STARTED_RE.findall(text)}
        procs = {r: proc_numbers(p) for r, p in pids.items()}
        # what the rest of the machine ran meanwhile: all busy time but tpd's, its workers' and
        # this script's, in cores; and what the hypervisor took from this VM
        busy1, steal1 = machine_cpu()
        own = cpu_of(self.tpd.pid) + sum(cpu_of(p) for p in pids.values()) + \
            sum(os.times()[:2]) - self0
        others = max(0.0, busy1 - busy0 - own) / ready
        steal = (steal1 - steal0) / ready
        loaded = {}
        for ln in text.splitlines():
            m = LOADED_RE.match(ln)
            if m:
                ts, rank, a, b, out, name, dtype, wb, bb, sec = m.groups()
                loaded[int(rank)] = dict(ts=stamp(ts), row0=int(a), row1=int(b), out=int(out),
                                         name=name, dtype=dtype, w_bytes=int(wb),
                                         b_bytes=int(bb), sec=float(sec))
        if sorted(loaded) != list(range(ranks)):
            raise BenchError("expected a 'loaded rows' line from each of %d ranks, got ranks %s:"
                             "\n%s" % (ranks, sorted(loaded), text[-3000:]))
        rows, cols = self.a.rows, self.a.cols
        row0 = 0
        for r in range(ranks):
            w = loaded[r]
            # the shard is the rank's own rows and only those: no more bytes read than it holds
            if (w["row0"] != row0 or w["out"] != rows or w["dtype"] != "BF16" or
                    w["w_bytes"] != (w["row1"] - w["row0"]) * cols * 2 or w["b_bytes"] != 0):
                raise BenchError("rank %d loaded %s, not its shard of [%d, %d] BF16" %
                                 (r, w, rows, cols))
            row0 = w["row1"]
        if row0 != rows:
            raise BenchError("the ranks loaded rows [0, %d) of %d" % (row0, rows))
        checked = self.check_forward(sock)
        rc = self.stop()
        if rc != 0:
            raise BenchError("tpd exited %d after SIGTERM" % rc)
        ready_ts = stamp(ready_m.group(1))
        last = [w["ts"] for w in loaded.values()]
        after = ready_ts - max(last) if ready_ts and None not in last else None
        return dict(ranks=ranks, ready=ready, read=max(w["sec"] for w in loaded.values()),
                    loaded=loaded, procs=procs, after=after, checked=checked, warmed=warmed,
                    others=others, steal=steal)

    def check_forward(self, sock):
        """One [2, cols] request through tpclient; 2 output columns against a float64 reference
        from the file's rows. Returns the largest relative error."""
        rows, cols = self.a.rows, self.a.cols
        rng = np.random.default_rng(self.starts)
        x = rng.standard_normal((2, cols)).astype(np.float32)
        xp, yp = os.path.join(self.tmp, "x.npy"), os.path.join(self.tmp, "y.npy")
        np.save(xp, x)
        p = subprocess.run([os.path.join(self.bin, "tpclient"), "--server", "unix:" + sock,
                            "forward", xp, "-o", yp], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=120)
        if p.returncode != 0:
            raise BenchError("tpclient forward exited %d: %s" % (p.returncode, p.stdout[-2000:]))
        y = np.load(yp)
        if y.shape != (2, rows):
            raise BenchError("tpclient forward gave shape %s, expected (2, %d)" % (y.shape, rows))
        # one column in each half: with 2 ranks, one from each
        which = (int(rng.integers(0, (rows + 1) // 2)), int(rng.integers(rows // 2, rows)))
        w = weight_rows(self.path, rows, cols, which)
        x64 = x.astype(np.float64)
        ref, mag = x64 @ w.T, np.abs(x64) @ np.abs(w).T
        err = float(np.max(np.abs(y[:, which].astype(np.float64) - ref) / mag))
        if not err <= TOLERANCE:
            raise BenchError("output columns %s are wrong: relative error %.3g > %g (tpd %s, "
                             "reference %s)" % (which, err, TOLERANCE, y[:, which].tolist(),
                                                ref.tolist()))
        return err

    def close(self):
        try:
            self.stop()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


# -- report ---------------------------------------------------------------------------------------


def gib(n):
    return n / float(1 << 30)


def report_environment(a, path, made, secs):
    cpu = cpu_model()
    thp = []
    for knob in ("enabled", "defrag"):
        try:
            with open("/sys/kernel/mm/transparent_hugepage/" + knob) as f:
                thp.append("%s %s" % (knob, f.read().strip()))
        except OSError:
            thp.append("%s ?" % knob)
    log("# tpd load benchmark, %s UTC" % time.strftime("%Y-%m-%d %H:%M", time.gmtime()))
    log("machine: %d cores (%s), %s, load %.2f %.2f %.2f" % ((os.cpu_count() or 1, cpu,
                                                            platform.platform()) +
                                                           os.getloadavg()))
    log("transparent huge pages: %s" % "; ".join(thp))
    fpr = free_page_reporting()
    log("free page reporting to a hypervisor (virtio-balloon): %s; memory: %s" % (
        fpr or "no balloon device", "touched and freed before each start (--warm-memory)"
        if a.warm_memory else "%g s of pause before each start (--pause)" % a.pause
        if a.pause else "as the machine gives it"))
    log("layer: '%s' BF16 [%d, %d], %.3f GiB of weights, in %s (%s)" % (
        NAME, a.rows, a.cols, gib(a.rows * a.cols * 2), path,
        "made in %.1f s" % secs if made else "found there"))
    log("ranks %s, %d rounds" % (",".join(str(r) for r in a.ranks), a.rounds))


def print_round(rnd, cat, r):
    bytes_per = [w["w_bytes"] for _, w in sorted(r["loaded"].items())]
    if r["warmed"]:
        n, secs = r["warmed"]
        log("  round %d  --cpu %d: first touched and freed %.2f GiB before the start in %.3f s "
            "(%.2f us per 4 KiB page)" % (rnd, r["ranks"], gib(n), secs, secs / (n / 4096) * 1e6))
    log("  round %d  --cpu %d: ready %.3f s, read %.3f s (max over ranks), after read %s; "
        "output checked (max rel err %.2g); meanwhile other work ran on %.2f cores, steal %.2f" %
        (rnd, r["ranks"], r["ready"], r["read"], "%.3f s" % r["after"] if r["after"] is not None
         else "?", r["checked"], r["others"], r["steal"]))
    for rank, w in sorted(r["loaded"].items()):
        pr = r["procs"].get(rank)
        log("    rank %d rows [%d, %d): %d bytes in %.3f s (%s GB/s)%s" % (
            rank, w["row0"], w["row1"], w["w_bytes"], w["sec"],
            "%.2f" % (w["w_bytes"] / w["sec"] / 1e9) if w["sec"] > 0 else "-",
            "; %d minor faults, peak RSS %.2f GiB, %.2f GiB in huge pages when ready" % (
                pr[0], gib(pr[1]), gib(pr[2])) if pr else ""))
    log("load-result: round=%d ranks=%d cat_s=%.4f ready_s=%.4f read_s=%.4f after_s=%s "
        "bytes_per_rank=%s checked=%.3g warm_s=%s others=%.2f" % (
            rnd, r["ranks"], cat, r["ready"], r["read"],
            "%.4f" % r["after"] if r["after"] is not None else "nan",
            ",".join(str(b) for b in bytes_per), r["checked"],
            "%.4f" % r["warmed"][1] if r["warmed"] else "-", r["others"]))


def summary(a, results):
    """results: [(round, cat best, measurement)]."""
    log("")
    log("## loading a %dx%d BF16 layer (ratios against cat in the same round)" % (a.rows, a.cols))
    log("| round | ranks | bytes per rank | cat s | worker read s (max) | read / cat | "
        "after read s | time to ready s | ready / cat | minor faults per rank | other load |")
    log("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for rnd, cat, r in results:
        per = sorted({w["w_bytes"] for w in r["loaded"].values()})
        faults = [p[0] for p in r["procs"].values() if p]
        log("| %d | %d | %s | %.3f | %.3f | %.2f | %s | %.3f | %.2f | %s | %.2f |" % (
            rnd, r["ranks"], ", ".join(str(b) for b in per), cat, r["read"], r["read"] / cat,
            "%.3f" % r["after"] if r["after"] is not None else "?", r["ready"],
            r["ready"] / cat, "%d" % max(faults) if faults else "?", r["others"]))
    log("")
    log("## targets (best round of each)")
    for ranks in a.ranks:
        mine = [(r["read"] / cat, r["ready"] / cat) for _, cat, r in results
                if r["ranks"] == ranks]
        best = min(m[0] for m in mine)
        spread = "" if len(mine) < 2 else " (rounds %s)" % ", ".join(
            "%.2f" % m[0] for m in mine)
        log("- --cpu %d: worker read / cat %.2f (target <= %g): %s%s; time to ready / cat %.2f" %
            (ranks, best, TARGET, "met" if best <= TARGET else "NOT met", spread,
             min(m[1] for m in mine)))


def main():
    ap = argparse.ArgumentParser(
        description="tpd's time to load a large BF16 layer, against cat of the same file.")
    ap.add_argument("--rows", type=int, default=128256, help="rows (outputs) of W (default 128256)")
    ap.add_argument("--cols", type=int, default=4096, help="columns (inputs) of W (default 4096)")
    ap.add_argument("--ranks", default="1,2",
                    help="tpd --cpu values, comma separated (default 1,2)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="rounds: the cat baseline, then every --ranks, each round (default 1)")
    ap.add_argument("--dir", help="where the layer is made, or found from an earlier --keep run "
                                  "(default: a temporary directory)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the layer this run made, for the next run with the same --dir")
    ap.add_argument("--warm-memory", action="store_true",
                    help="before each tpd start, first touch and free as much memory as its "
                         "ranks will hold, so that they get memory the host already backs (see "
                         "docs/performance.md, 'Loading a layer')")
    ap.add_argument("--pause", type=float, default=0,
                    help="seconds to wait before each tpd start, so that the memory freed before "
                         "it has gone back to the host (20 s was enough on the VM of "
                         "docs/performance.md): each start then pays for its first touches as "
                         "after a long idle")
    ap.add_argument("--seed", type=int, default=1, help="seed of the random weights (default 1)")
    ap.add_argument("--timeout", type=float, default=600,
                    help="seconds tpd may take to be ready (default 600)")
    ap.add_argument("--build", default=os.path.join(ROOT, "build"), help="build directory")
    a = ap.parse_args()
    try:
        a.ranks = [int(r) for r in a.ranks.split(",") if r.strip()]
    except ValueError:
        ap.error("--ranks must be integers, comma separated")
    if a.rows < 1 or a.cols < 1 or a.rounds < 1 or not a.ranks or min(a.ranks) < 1:
        ap.error("--rows, --cols, --rounds and --ranks must be positive")
    if max(a.ranks) > a.rows:
        ap.error("--ranks cannot exceed --rows")
    if a.pause < 0 or (a.pause and a.warm_memory):
        ap.error("--pause must be positive, and not with --warm-memory")
    made_dir = a.dir is None
    directory = a.dir or tempfile.mkdtemp(prefix="tpload-layer.")
    path, made, bench = None, False, None
    try:
        os.makedirs(directory, exist_ok=True)
        t0 = time.monotonic()
        path, made = make_layer(directory, a.rows, a.cols, a.seed)
        report_environment(a, path, made, time.monotonic() - t0)
        bench = Bench(a, path)
        results = []
        for rnd in range(1, a.rounds + 1):
            log("round %d: load %.2f %.2f %.2f" % ((rnd,) + os.getloadavg()))
            warm(path)
            cats = time_cat(path)
            cat = min(cats)
            log("  cat baseline: `cat FILE > /dev/null` from the page cache, best of %d: %.3f s "
                "(%.2f GB/s; runs %s)" % (len(cats), cat, os.path.getsize(path) / cat / 1e9,
                                          " ".join("%.3f" % c for c in cats)))
            for ranks in a.ranks:
                r = bench.measure(ranks)
                results.append((rnd, cat, r))
                print_round(rnd, cat, r)
        summary(a, results)
        log("")
        log("load %.2f %.2f %.2f at the end" % os.getloadavg())
    except BenchError as e:
        print("load.py: error: %s" % e, file=sys.stderr)
        return 1
    finally:
        if bench:
            bench.close()
        if path and made and not a.keep:
            os.unlink(path)
        elif path and made:
            log("kept %s" % path)
        if made_dir and not a.keep:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
