#!/usr/bin/env python3
"""block.py -- how fast tpd serves an MLP block, against the same block in-process, in the same
run.

    build/venv/bin/python bench/block.py [--hidden H] [--inter I] [--batches 1,16,64]
                                         [--ranks 1,2] [--iters K] [--dir DIR] ...

(after scripts/build.sh; it needs numpy and tritonclient[grpc], which scripts/venv.sh puts in
build/venv).

It makes (once per shape and seed, kept in --dir) a Llama-style checkpoint directory of one
gated block, model.layers.0.mlp: gate_proj and up_proj [I, H], down_proj [H, I], FP32, values
N(0, 1) / sqrt(fan_in), no biases, and config.json saying llama and silu; and, beside it,
gate_up.safetensors holding one tensor 'weight' = [gate; up] of [2 I, H]. Both are written in
chunks, header and all, so that no more than a chunk is ever in memory. --dir defaults to
/tmp/tpd-bench-block-HxI and is left there for the next run (at the default shape 0.50 GiB of
block and 0.34 GiB of gate|up). Then, for every batch B
of --batches (each B x H input drawn once, its answer computed in float64 from the files):

  numpy   the baseline: one process with OPENBLAS_NUM_THREADS (and OMP_, MKL_) set to
          --threads-total before numpy starts computes y = down(silu(gate(x)) * up(x)) in
          float32, back to back: what a program that holds the block in memory gets from the
          same cores;
  tpd     for each --ranks N, `tpd --block model.layers.0.mlp --cpu N` on a unix socket, one
          client sending one request at a time (tritonclient over gRPC), after a checked
          request and a warm-up. Each worker's debug line of each job says how long the job
          took on it and how much of that it spent waiting for the other ranks and reducing:
          the all-reduce, whose share of the job is reported, and whose reduce is set against
          memcpy of the bytes one rank's reduce reads (N stripes of [B, H / N] float32, copied
          with numpy, which adds a call's cost of about a microsecond: the floor is printed);
  naive   the block without tpd's all-reduce: tpd --cpu N serves gate|up as one column layer
          (gate_up.safetensors), and the client computes silu(g) * u and the down projection
          itself, with numpy on --threads-total threads; the time is end to end per forward.

The workers of tpd --cpu N get (the cores this process may run on) / N threads each, as tpd
decides; the numpy sides get --threads-total. One answer of every side and batch is checked
against the float64 reference (max |y - ref| / max |ref| <= 1e-4); a wrong answer fails the
run. tpd gets SIGTERM after each measurement and must exit 0.

It prints every measurement, the machine and its load average before each, a `block-result:`
line of key=value per (batch, ranks), and a markdown table with the ratios against numpy measured
in this run. It asserts nothing about speed.
"""

import argparse
import ctypes
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchutil import cpu_model, stop_tpd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = "model.layers.0.mlp"
NAMES = ("gate_proj", "up_proj", "down_proj")
CONFIG = {"model_type": "llama", "hidden_act": "silu"}
NAIVE_FILE = "gate_up.safetensors"
TOLERANCE = 1e-4  # max |y - ref| / max |ref|: FP32 sums of about 2 I products
CHUNK_BYTES = 64 << 20  # bytes of weights made, copied or widened at once
LINE = 16  # floats of a cache line: the unit of a rank's reduce stripe (worker/block.c)
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

READY_RE = re.compile(r"tpd: notice: ready: serving ")
STARTED_RE = re.compile(r"tpd: notice: started worker rank (\d+) pid (\d+)")
THREADS_RE = re.compile(r"tpd: notice: .*, (\d+) threads each, ")
JOB_RE = re.compile(r"tpd-worker rank (\d+): debug: job \d+: (\d+) rows in ([0-9.]+) ms"
                    r"(?:, of which ([0-9.]+) ms waiting for the other ranks and ([0-9.]+) ms "
                    r"reducing)?$")


class BenchError(Exception):
    pass


def log(*a):
    print(*a, flush=True)


def median(v):
    return statistics.median(v) if v else float("nan")


def load_line():
    return "load %.2f %.2f %.2f" % os.getloadavg()


# -- the checkpoint -------------------------------------------------------------------------------


def header_bytes(tensors, seed):
    """A safetensors header for [(name, shape)] of F32, stored in that order."""
    meta, off = {"__metadata__": {"format": "pt", "seed": str(seed)}}, 0
    for name, shape in tensors:
        n = 4 * shape[0] * shape[1]
        meta[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    text = json.dumps(meta).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, off


def block_tensors(hidden, inter):
    return [("%s.%s.weight" % (MODULE, "gate_proj"), (inter, hidden)),
            ("%s.%s.weight" % (MODULE, "up_proj"), (inter, hidden)),
            ("%s.%s.weight" % (MODULE, "down_proj"), (hidden, inter))]


def is_complete(path, head, nbytes):
    if not os.path.isfile(path) or os.path.getsize(path) != len(head) + nbytes:
        return False
    with open(path, "rb") as f:
        return f.read(len(head)) == head


def tensor_map(path):
    """{name: float32 memmap} of a safetensors file of F32 tensors."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        meta = json.loads(f.read(n))
    out = {}
    for name, t in meta.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        out[name] = np.memmap(path, dtype="<f4", mode="r", offset=8 + n + a,
                              shape=tuple(t["shape"]))
    return out


def make_checkpoint(directory, hidden, inter, seed):
    """Makes the block's checkpoint directory and the gate|up file in directory, unless both are
    there already, complete and of this shape and seed. Returns whether this call made them."""
    os.makedirs(directory, exist_ok=True)
    model = os.path.join(directory, "model.safetensors")
    naive = os.path.join(directory, NAIVE_FILE)
    config = os.path.join(directory, "config.json")
    tensors = block_tensors(hidden, inter)
    head, nbytes = header_bytes(tensors, seed)
    nhead, nnbytes = header_bytes([("weight", (2 * inter, hidden))], seed)
    try:
        with open(config) as f:
            config_ok = json.load(f) == CONFIG
    except (OSError, ValueError):
        config_ok = False
    if config_ok and is_complete(model, head, nbytes) and is_complete(naive, nhead, nnbytes):
        return False
    rng = np.random.default_rng(seed)
    part = model + ".part"  # renamed when complete, so that an interrupted run leaves no cache
    with open(part, "wb") as f:
        f.write(head)
        for _, (rows, cols) in tensors:
            step = max(1, CHUNK_BYTES // (4 * cols))
            scale = np.float32(1.0 / math.sqrt(cols))
            for r0 in range(0, rows, step):
                w = rng.standard_normal((min(step, rows - r0), cols), dtype=np.float32)
                w *= scale
                f.write(w.tobytes())
    os.replace(part, model)
    # gate|up: gate's rows then up's, copied from the file just made
    t = tensor_map(model)
    part = naive + ".part"
    with open(part, "wb") as f:
        f.write(nhead)
        for name, (rows, cols) in tensors[:2]:
            step = max(1, CHUNK_BYTES // (4 * cols))
            for r0 in range(0, rows, step):
                f.write(np.asarray(t[name][r0:r0 + step]).tobytes())
    del t
    os.replace(part, naive)
    with open(config + ".part", "w") as f:
        json.dump(CONFIG, f)
    os.replace(config + ".part", config)
    return True


def weights(directory, hidden, inter):
    """(gate, up, down) as float32 memmaps of the block's file."""
    t = tensor_map(os.path.join(directory, "model.safetensors"))
    return tuple(t[name] for name, _ in block_tensors(hidden, inter))


def reference(directory, hidden, inter, x):
    """y = down(silu(gate(x)) * up(x)) in float64, a slice of the intermediate at a time."""
    wg, wu, wd = weights(directory, hidden, inter)
    x64 = x.astype(np.float64)
    y = np.zeros((x.shape[0], hidden))
    step = max(1, CHUNK_BYTES // (8 * max(hidden, 1)))
    for i0 in range(0, inter, step):
        i1 = min(inter, i0 + step)
        g = x64 @ np.asarray(wg[i0:i1], dtype=np.float64).T
        u = x64 @ np.asarray(wu[i0:i1], dtype=np.float64).T
        with np.errstate(over="ignore"):
            h = g / (1.0 + np.exp(-g)) * u
        y += h @ np.asarray(wd[:, i0:i1], dtype=np.float64).T
    return y


def rel_error(y, ref):
    y = np.asarray(y, dtype=np.float64)
    if y.shape != ref.shape:
        raise BenchError("answer of shape %s, expected %s" % (y.shape, ref.shape))
    return float(np.max(np.abs(y - ref)) / np.max(np.abs(ref)))


# -- the measuring processes ----------------------------------------------------------------------
# Each runs this file again with --role, so that the thread variables are in its environment
# before numpy starts. It reads x_B.npy of the work directory, writes the checked answer to
# y_ROLE_B.npy and its timings to ROLE.json.


def blas_info():
    """What numpy's BLAS says about itself: library, core it picked, threads."""
    cfg = np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})
    text = "%s %s" % (cfg.get("name", "?"), cfg.get("version", "?"))
    libs = set()
    with open("/proc/self/maps") as f:
        for ln in f:
            if "blas" in ln.lower() and ln.split()[-1].startswith("/"):
                libs.add(ln.split()[-1])
    for path in sorted(libs):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("openblas_", ""), ("scipy_openblas_", "64_"),
                               ("openblas_", "64_")):
            try:
                core = getattr(lib, prefix + "get_corename" + suffix)
                threads = getattr(lib, prefix + "get_num_threads" + suffix)
            except AttributeError:
                continue
            core.restype = ctypes.c_char_p
            return "%s, core %s, %d threads (%s)" % (text, core().decode(), threads(),
                                                     os.path.basename(path))
    return text + " (its core and threads unknown)"


def silu_mul(g, u):
    with np.errstate(over="ignore"):
        return g / (np.float32(1) + np.exp(-g)) * u


def role_main(a):
    work = a.work
    out = {"blas": blas_info(), "batches": {}}
    wd = client = None
    if a.role == "numpy":
        wg, wu, wd = (np.ascontiguousarray(w) for w in weights(a.dir, a.hidden, a.inter))
    else:
        import tritonclient.grpc as tgrpc
        client = tgrpc.InferenceServerClient(url=a.addr)
        if a.role == "naive":
            wd = np.ascontiguousarray(weights(a.dir, a.hidden, a.inter)[2])
    for b in a.batches:
        x = np.load(os.path.join(work, "x_%d.npy" % b))
        if client is not None:
            inp = tgrpc.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)

        if a.role == "numpy":
            def forward():
                return silu_mul(x @ wg.T, x @ wu.T) @ wd.T
        elif a.role == "block":
            def forward():
                return client.infer(a.model, [inp]).as_numpy("output")
        else:
            def forward():
                t = client.infer(a.model, [inp]).as_numpy("output")
                return silu_mul(t[:, :a.inter], t[:, a.inter:]) @ wd.T
        load = os.getloadavg()
        np.save(os.path.join(work, "y_%s_%d.npy" % (a.role, b)), forward())
        for _ in range(a.warmup):
            forward()
        ms = []
        for _ in range(a.iters):
            t0 = time.perf_counter()
            forward()
            ms.append((time.perf_counter() - t0) * 1e3)
        out["batches"][str(b)] = {"ms": ms, "load": load}
    if client is not None:
        client.close()
    with open(os.path.join(work, a.role + ".json"), "w") as f:
        json.dump(out, f)
    return 0


# -- the driver -----------------------------------------------------------------------------------


class Bench:
    def __init__(self, a):
        self.a = a
        self.bin = os.path.join(os.path.abspath(a.build), "bin")
        for name in ("tpd", "tpd-worker"):
            if not os.access(os.path.join(self.bin, name), os.X_OK):
                raise BenchError("%s/%s is missing: build first (scripts/build.sh)" %
                                 (self.bin, name))
        self.work = tempfile.mkdtemp(prefix="tpblock.")
        self.tpd = None
        self.starts = 0
        self.env = dict(os.environ)
        for var in THREAD_VARS:
            self.env[var] = str(a.threads_total)

    def measure_role(self, role, addr=None, model=None):
        """Runs this file as role over every batch; {batch: (ms list, load)}, and the BLAS line."""
        a = self.a
        cmd = [sys.executable, os.path.abspath(__file__), "--role", role, "--work", self.work,
               "--dir", a.dir, "--hidden", str(a.hidden), "--inter", str(a.inter), "--batches",
               ",".join(str(b) for b in a.batches), "--iters", str(a.iters), "--warmup",
               str(a.warmup)]
        if addr:
            cmd += ["--addr", addr, "--model", model]
        try:
            p = subprocess.run(cmd, env=self.env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, timeout=a.timeout)
        except subprocess.TimeoutExpired:
            raise BenchError("the %s measurement took more than %.0f s" % (role, a.timeout))
        if p.returncode != 0:
            raise BenchError("the %s measurement exited %d:\n%s" % (role, p.returncode,
                                                                   p.stdout[-3000:]))
        with open(os.path.join(self.work, role + ".json")) as f:
            out = json.load(f)
        return {int(b): (v["ms"], v["load"]) for b, v in out["batches"].items()}, out["blas"]

    def check(self, role, refs):
        """The largest relative error of role's checked answers, over the batches."""
        worst = 0.0
        for b, ref in refs.items():
            y = np.load(os.path.join(self.work, "y_%s_%d.npy" % (role, b)))
            err = rel_error(y, ref)
            if not err <= TOLERANCE:
                raise BenchError("%s answered batch %d wrongly: max |y - ref| / max |ref| = %.3g "
                                 "> %g" % (role, b, err, TOLERANCE))
            worst = max(worst, err)
        return worst

    def start(self, ranks, weights_path, extra, model):
        self.starts += 1
        sock = os.path.join(self.work, "s%d.sock" % self.starts)
        log_path = os.path.join(self.work, "tpd%d.log" % self.starts)
        cmd = [os.path.join(self.bin, "tpd"), "--weights", weights_path] + extra + [
            "--cpu", str(ranks), "--model", model, "--listen", "unix:" + sock,
            "--metrics-listen", "off", "--http-listen", "off", "--config", "none", "--log-level", "debug",
            "--max-batch", str(max(256, max(self.a.batches)))]
        with open(log_path, "w") as f:
            self.tpd = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.a.timeout
        text = ""
        with open(log_path) as f:
            while not READY_RE.search(text):
                text += f.read()
                if self.tpd.poll() is not None:
                    raise BenchError("tpd exited %d before it was ready: %s\n%s" % (
                        self.tpd.returncode, " ".join(cmd), text[-3000:]))
                if time.monotonic() > deadline:
                    raise BenchError("tpd was not ready after %.0f s:\n%s" % (self.a.timeout,
                                                                              text[-3000:]))
                time.sleep(0.005)
        m = THREADS_RE.search(text)
        return "unix:" + sock, log_path, int(m.group(1)) if m else None

    def stop(self):
        """SIGTERM to tpd; its exit status (it drains, stops its workers and exits 0)."""
        p, self.tpd = self.tpd, None
        return stop_tpd(p, BenchError)

    def kill(self):
        p, self.tpd = self.tpd, None
        if p is not None and p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                p.kill()
            p.wait()

    def serve(self, ranks, naive):
        """One tpd, one client over every batch: {batch: (ms, load)}, the log, threads per rank."""
        if naive:
            path, extra, model, role = (os.path.join(self.a.dir, NAIVE_FILE),
                                        ["--weight", "weight"], "gate_up", "naive")
        else:
            path, extra, model, role = self.a.dir, ["--block", MODULE], "block", "block"
        addr, log_path, threads = self.start(ranks, path, extra, model)
        try:
            res, _ = self.measure_role(role, addr, model)
        finally:
            rc = self.stop()
        if rc != 0:
            raise BenchError("tpd exited %d after SIGTERM" % rc)
        with open(log_path) as f:
            text = f.read()
        return res, text, threads

    def close(self):
        try:
            self.kill()
        finally:
            shutil.rmtree(self.work, ignore_errors=True)


def jobs_of(text, ranks, batch, measured, reducing):
    """The workers' lines of the measured jobs of a batch: each rank's last `measured` jobs of
    that many rows, as [(job ms, wait ms, reduce ms)] over all ranks, and the jobs each rank
    logged for that batch."""
    per = {r: [] for r in range(ranks)}
    for ln in text.splitlines():
        m = JOB_RE.search(ln)
        if m and int(m.group(2)) == batch:
            per.setdefault(int(m.group(1)), []).append(
                (float(m.group(3)), float(m.group(4) or "nan"), float(m.group(5) or "nan")))
    counts = [len(per[r]) for r in range(ranks)]
    if sorted(per) != list(range(ranks)) or min(counts) < measured:
        raise BenchError("expected at least %d job lines of %d rows from each of %d ranks, got "
                         "%s" % (measured, batch, ranks, {r: len(v) for r, v in per.items()}))
    lines = [j for r in range(ranks) for j in per[r][-measured:]]
    if not reducing:  # one rank writes its sum in place: no all-reduce to time
        lines = [(j[0], 0.0, 0.0) for j in lines]
    if reducing and any(math.isnan(j[1]) for j in lines):
        raise BenchError("a block's job line of %d rows says nothing of its all-reduce" % batch)
    return lines, counts


def stripe0(out, ranks):
    """Columns of rank 0's reduce stripe (block_stripe: whole lines, the first ranks one more)."""
    lines = (out + LINE - 1) // LINE
    return min(out, (lines // ranks + (lines % ranks > 0)) * LINE)


def copy_ms(floats, reps=200):
    """Median ms of np.copyto of floats float32 between two arrays made beforehand."""
    src = np.ones(max(1, floats), dtype=np.float32)
    dst = np.empty_like(src)
    for _ in range(10):
        np.copyto(dst, src)
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        t.append((time.perf_counter() - t0) * 1e3)
    return median(t)


def report_machine(a, made, secs):
    cpu = cpu_model()
    log("# tpd block benchmark, %s UTC" % time.strftime("%Y-%m-%d %H:%M", time.gmtime()))
    log("machine: %d cores online, %d for this process (%s), %s, %s" % (
        os.cpu_count() or 1, len(os.sched_getaffinity(0)), cpu, platform.platform(),
        load_line()))
    log("OPENBLAS_CORETYPE=%s" % os.environ.get("OPENBLAS_CORETYPE", "(unset)"))
    log("block: %s, gated silu, hidden %d, intermediate %d, FP32: %.3f GiB of weights, in %s "
        "(%s)" % (MODULE, a.hidden, a.inter, 3 * a.hidden * a.inter * 4 / float(1 << 30), a.dir,
                  "made in %.1f s" % secs if made else "found there"))
    log("batches %s, ranks %s, %d iterations after %d of warm-up per point, numpy on %d threads"
        % (",".join(map(str, a.batches)), ",".join(map(str, a.ranks)), a.iters, a.warmup,
           a.threads_total))


def run_bench(a):
    bench = Bench(a)
    try:
        t0 = time.monotonic()
        made = make_checkpoint(a.dir, a.hidden, a.inter, a.seed)
        report_machine(a, made, time.monotonic() - t0)
        refs = {}
        rng = np.random.default_rng(a.seed + 1000)
        for b in a.batches:
            x = rng.standard_normal((b, a.hidden), dtype=np.float32)
            np.save(os.path.join(bench.work, "x_%d.npy" % b), x)
            refs[b] = reference(a.dir, a.hidden, a.inter, x)

        log("numpy (%s): in-process, %s" % (",".join(map(str, a.batches)), load_line()))
        base, blas = bench.measure_role("numpy")
        base_err = bench.check("numpy", refs)
        log("  numpy's BLAS: %s" % blas)
        for b in a.batches:
            ms, load = base[b]
            log("  batch %d: median %.3f ms, %.1f rows/s (load %.2f before)" % (
                b, median(ms), b / median(ms) * 1e3, load[0]))
        log("  checked: max rel err %.2g" % base_err)

        points = {}
        for ranks in a.ranks:
            for naive in (False, True):
                what = "naive (gate|up column layer, the rest in the client)" if naive else \
                    "block"
                log("tpd --cpu %d, %s: %s" % (ranks, what, load_line()))
                res, text, threads = bench.serve(ranks, naive)
                err = bench.check("naive" if naive else "block", refs)
                log("  workers: %s threads each; checked: max rel err %.2g" % (threads, err))
                for b in a.batches:
                    ms, load = res[b]
                    jobs, counts = jobs_of(text, ranks, b, a.iters, not naive and ranks > 1)
                    p = points.setdefault((b, ranks), {})
                    key = "naive" if naive else "tpd"
                    p[key] = dict(ms=median(ms), err=err, load=load[0], threads=threads,
                                  job=median([j[0] for j in jobs]), counts=counts)
                    if not naive:
                        p[key].update(wait=median([j[1] for j in jobs]),
                                      reduce=median([j[2] for j in jobs]),
                                      allreduce=median([j[1] + j[2] for j in jobs]),
                                      wait_rank=[median([j[1] for j in jobs[r * a.iters:
                                                                             (r + 1) * a.iters]])
                                                 for r in range(ranks)])
                    q = p[key]
                    log("  batch %d: median %.3f ms, %.1f rows/s (load %.2f before); workers: "
                        "job %.3f ms%s; %s job lines per rank" % (
                            b, q["ms"], b / q["ms"] * 1e3, q["load"], q["job"],
                            "" if naive else ", of which waiting %.3f ms (per rank %s) and "
                            "reducing %.3f ms: all-reduce %.3f ms, %.1f%% of the job" % (
                                q["wait"], " ".join("%.3f" % w for w in q["wait_rank"]),
                                q["reduce"], q["allreduce"], 100 * q["allreduce"] / q["job"]),
                            ",".join(map(str, counts))))

        floor = copy_ms(1)
        log("memcpy (np.copyto, median of 200; a call of one float takes %.2f us): %s" % (
            floor * 1e3, load_line()))
        for (b, ranks), p in sorted(points.items()):
            share = ranks * b * stripe0(a.hidden, ranks)
            p["memcpy"] = copy_ms(share)
            p["memcpy_all"] = copy_ms(ranks * b * a.hidden)
            log("  batch %d, ranks %d: one rank's reduce reads %d floats: memcpy %.2f us, its "
                "reduce %.0f us, reduce / memcpy %.2f; all ranks' %d floats: %.2f us" % (
                    b, ranks, share, p["memcpy"] * 1e3, p["tpd"]["reduce"] * 1e3,
                    p["tpd"]["reduce"] / p["memcpy"], ranks * b * a.hidden,
                    p["memcpy_all"] * 1e3))
    finally:
        bench.close()

    log("")
    for b in a.batches:
        nb = median(base[b][0])
        for ranks in a.ranks:
            p = points[(b, ranks)]
            t, n = p["tpd"], p["naive"]
            log("block-result: batch=%d ranks=%d hidden=%d inter=%d iters=%d threads_total=%d "
                "worker_threads=%s numpy_ms=%.6f numpy_rows_per_s=%.3f tpd_ms=%.6f "
                "tpd_rows_per_s=%.3f tpd_over_numpy=%.4g job_ms=%.6f wait_ms=%.6f "
                "reduce_ms=%.6f allreduce_ms=%.6f allreduce_pct=%.3f memcpy_ms=%.6f "
                "memcpy_all_ms=%.6f reduce_over_memcpy=%.4f naive_ms=%.6f "
                "naive_rows_per_s=%.3f naive_over_numpy=%.4g naive_job_ms=%.6f "
                "jobs_per_rank=%s checked=%.3g naive_checked=%.3g numpy_checked=%.3g" % (
                    b, ranks, a.hidden, a.inter, a.iters, a.threads_total, t["threads"], nb,
                    b / nb * 1e3, t["ms"], b / t["ms"] * 1e3, nb / t["ms"], t["job"], t["wait"],
                    t["reduce"], t["allreduce"], 100 * t["allreduce"] / t["job"], p["memcpy"],
                    p["memcpy_all"], t["reduce"] / p["memcpy"], n["ms"], b / n["ms"] * 1e3,
                    nb / n["ms"], n["job"], ",".join(map(str, t["counts"])), t["err"], n["err"],
                    base_err))

    log("")
    log("## MLP block %d -> %d -> %d, FP32 (ratios against numpy in the same run)" % (
        a.hidden, a.inter, a.hidden))
    log("| batch | ranks | numpy ms | numpy rows/s | tpd ms | tpd rows/s | tpd / numpy | "
        "worker job ms | all-reduce ms (% of job) | reduce / memcpy | naive ms | naive rows/s | "
        "naive / numpy | naive / tpd ms |")
    log("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
        "---: | ---: |")
    for b in a.batches:
        nb = median(base[b][0])
        for ranks in a.ranks:
            p = points[(b, ranks)]
            t, n = p["tpd"], p["naive"]
            log("| %d | %d | %.3f | %.1f | %.3f | %.1f | %.2f | %.3f | %.3f (%.1f%%) | %.2f | "
                "%.3f | %.1f | %.2f | %.2f |" % (
                    b, ranks, nb, b / nb * 1e3, t["ms"], b / t["ms"] * 1e3, nb / t["ms"],
                    t["job"], t["allreduce"], 100 * t["allreduce"] / t["job"],
                    t["reduce"] / p["memcpy"], n["ms"], b / n["ms"] * 1e3, nb / n["ms"],
                    n["ms"] / t["ms"]))
    log("")
    log("%s at the end" % load_line())
    return 0


def int_list(text):
    out = []
    for item in text.split(","):
        if item.strip():
            v = int(item)
            if v not in out:
                out.append(v)
    return out


def main():
    ap = argparse.ArgumentParser(
        description="tpd serving an MLP block, against the same block in-process with numpy.")
    ap.add_argument("--hidden", type=int, default=4096, help="hidden size H (default 4096)")
    ap.add_argument("--inter", type=int, default=11008,
                    help="intermediate size I (default 11008)")
    ap.add_argument("--batches", default="1,16,64",
                    help="rows per request, comma separated (default 1,16,64)")
    ap.add_argument("--ranks", default="1,2", help="tpd --cpu values, comma separated "
                                                   "(default 1,2)")
    ap.add_argument("--iters", type=int, default=20,
                    help="measured forwards per batch and side (default 20)")
    ap.add_argument("--warmup", type=int, default=3,
                    help="forwards before those, after the checked one (default 3)")
    ap.add_argument("--dir", help="where the checkpoint is made, or found from an earlier run "
                                  "(default /tmp/tpd-bench-block-HxI)")
    ap.add_argument("--threads-total", type=int, default=len(os.sched_getaffinity(0)),
                    help="BLAS threads of the numpy sides (default: the cores this process may "
                         "run on, %(default)s, which tpd's ranks share)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the weights (default 1)")
    ap.add_argument("--timeout", type=float, default=1800,
                    help="seconds a tpd start or a side's measurement may take (default 1800)")
    ap.add_argument("--build", default=os.path.join(ROOT, "build"), help="build directory")
    ap.add_argument("--role", choices=("numpy", "block", "naive"), help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--addr", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    a = ap.parse_args()
    try:
        a.batches, a.ranks = int_list(a.batches), int_list(a.ranks)
    except ValueError:
        ap.error("--batches and --ranks must be integers, comma separated")
    if not a.batches or not a.ranks or min(a.batches + a.ranks) < 1:
        ap.error("--batches and --ranks must be positive")
    if a.hidden < 1 or a.inter < 1 or a.iters < 1 or a.warmup < 0 or a.threads_total < 1:
        ap.error("--hidden, --inter, --iters and --threads-total must be positive")
    if max(a.ranks) > a.inter:
        ap.error("--ranks cannot exceed --inter")
    a.dir = os.path.abspath(a.dir or "/tmp/tpd-bench-block-%dx%d" % (a.hidden, a.inter))
    if a.role:
        return role_main(a)
    try:
        return run_bench(a)
    except BenchError as e:
        print("block.py: error: %s" % e, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
