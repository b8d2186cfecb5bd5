#!/usr/bin/env python3
"""run.py -- tpd's benchmark harness: tpd against its two baselines, in the same run, on the
same cores, round after round.

    python3 bench/run.py [--quick] [options]        (after scripts/build.sh; standard library only)

For each --cpu N and each shape B x IN -> OUT it starts real processes (tpd with N worker ranks
on a unix socket in a temporary directory, and bench/echo_server on another) and, in every
round, runs back to back:

  sgemm   build/bin/gemm_baseline: one in-process cblas_sgemm of the whole shape with N x
          (cores / N) OpenBLAS threads -- the cores tpd's N ranks get, cores / N threads each;
  sgemm-ranks  (N > 1) gemm_baseline --ranks N: tpd's layout without tpd, N forked processes of
          cores / N threads, each computing its column block into one shared output;
  igemm   gemm_baseline --gemm invariant: the same in-process call with tpd's batch-invariant
          GEMM (lib/gemm.c), the one tpd's cpu ranks use by default;
  echo    tpclient bench against echo_server: the same client, request and response sizes and
          socket, with a server that answers at once without computing (gRPC + protobuf floor);
  tpd     tpclient bench against tpd (its default GEMM: invariant);
  tpd-openblas  the same against a tpd with --cpu-gemm openblas: what batch invariance costs
          end to end;
  tpd-shm the same with --shm (tensors in registered POSIX shared memory), where both tpclient
          and tpd support it;
  perf_analyzer  Triton's load generator against tpd over TCP (gRPC), where it runs on this
          machine (scripts/perf-analyzer.sh installs the build that runs on Debian 12);
  perf_analyzer-shm  the same with --shared-memory system;
  perf_analyzer-stream  the same with --streaming (ModelStreamInfer);
  perf_analyzer-http  the same over tpd's REST API (-i http: binary tensors, its only kind);
  http-json  the REST API with JSON tensors: keep-alive connections (one per concurrent client)
          that post a JSON body encoded once, and read the JSON answer without parsing it, so
          the row is tpd's cost of JSON (and the bytes), not the client's.

It prints every round, then the median over rounds of each number and of the per-round ratios
tpd / sgemm (throughput) and tpd p50 / (echo p50 + sgemm p50) (latency), the cost of batch
invariance (igemm / sgemm, tpd / tpd-openblas), and the targets of docs/performance.md. A last case measures dynamic batching: many concurrent batch-1 clients with
tpd's --batch-delay-us 0 and with a delay. Rows that the build cannot run (a missing tpd or
tpclient flag) print "n/a (not supported by this build)"; nothing else is skipped.

The environment is passed unchanged to every program, so OPENBLAS_CORETYPE (which picks the
GEMM kernel) and OPENBLAS_L2_SIZE apply alike to the baseline and to tpd's workers; the report
starts with their values.
"""

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NA = "n/a (not supported by this build)"
ENV_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
            "GOTO_NUM_THREADS")

FULL_SHAPES = "1x1024x4096,64x4096x4096,512x4096x4096,2048x1024x4096"
SMOKE_SHAPES = "1x64x96,8x64x96,4x32x48"


class BenchError(Exception):
    pass


def log(*a):
    print(*a, flush=True)


def parse_kv(text, prefix):
    """The key=value pairs of the last line of text that starts with prefix."""
    lines = [ln for ln in text.splitlines() if ln.startswith(prefix)]
    if not lines:
        raise BenchError("no '%s' line in:\n%s" % (prefix, text[-2000:]))
    out = {}
    for item in lines[-1][len(prefix):].split():
        k, _, v = item.partition("=")
        try:
            out[k] = float(v)
        except ValueError:
            out[k] = v
    return out


def run(cmd, timeout):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=timeout)
    if p.returncode != 0:
        raise BenchError("%s exited %d:\n%s" % (" ".join(cmd), p.returncode, p.stdout[-3000:]))
    return p.stdout


class Procs:
    """Every server the harness started; all are stopped at the end, whatever happens."""

    def __init__(self):
        self.procs = []

    def start(self, cmd, log_path):
        f = open(log_path, "w")
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, text=True)
        f.close()
        self.procs.append(p)
        return p

    def stop(self, p):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self):
        for p in list(self.procs):
            self.stop(p)


class Harness:
    def __init__(self, a):
        self.a = a
        self.bin = os.path.join(os.path.abspath(a.build), "bin")
        for name in ("tpd", "tpd-worker", "tpclient", "gemm_baseline", "echo_server"):
            if not os.access(os.path.join(self.bin, name), os.X_OK):
                raise BenchError("%s/%s is missing: build first (scripts/build.sh)" %
                                 (self.bin, name))
        self.tmp = tempfile.mkdtemp(prefix="tpbench.")
        self.procs = Procs()
        self.cores = os.cpu_count() or 1
        self.tpd_help = run([self.exe("tpd"), "--help"], 30)
        self.client_help = run([self.exe("tpclient"), "--help"], 30)
        self.has_batch_delay = "--batch-delay-us" in self.tpd_help
        self.has_cpu_gemm = "--cpu-gemm" in self.tpd_help
        self.client_shm = "--shm" in self.client_help
        self.server_shm = {}  # tpd socket -> supports shared memory (probed once)
        self.perf_analyzer, self.perf_analyzer_why = self.find_perf_analyzer()
        self.results = []  # dicts, one per measurement

    def exe(self, name):
        return os.path.join(self.bin, name)

    # -- environment ----------------------------------------------------------------------------

    def report_environment(self):
        cpu = "unknown"
        try:
            with open("/proc/cpuinfo") as f:
                for ln in f:
                    if ln.startswith("model name"):
                        cpu = ln.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        blas = run([self.exe("gemm_baseline"), "--rows", "1", "--in", "8", "--out", "8",
                    "--iters", "1"], 60)
        blas = next((ln for ln in blas.splitlines() if ln.startswith("openblas:")), "openblas: ?")
        log("# tpd benchmark, %s UTC" % time.strftime("%Y-%m-%d %H:%M", time.gmtime()))
        log("machine: %d cores (%s), %s, %s" % (self.cores, cpu, platform.platform(),
                                                 "load %.2f %.2f %.2f" % os.getloadavg()))
        for var in ENV_VARS:
            log("%s=%s" % (var, os.environ.get(var, "(unset)")))
        log(blas)
        log("tpd flags: %s" % (" ".join(self.a.tpd_args) or "(none extra)"))
        log("features: --batch-delay-us %s; --cpu-gemm %s; tpclient bench --shm %s; "
            "perf_analyzer %s" % (
            "yes" if self.has_batch_delay else "no", "yes" if self.has_cpu_gemm else "no",
            "yes" if self.client_shm else "no",
            self.perf_analyzer or "no (%s)" % self.perf_analyzer_why))
        log("rounds %d, %.1f s per measurement" % (self.a.rounds, self.a.seconds))

    def find_perf_analyzer(self):
        cands = []
        if self.a.perf_analyzer:
            cands.append(self.a.perf_analyzer)
        found = shutil.which("perf_analyzer")
        if found:
            cands.append(found)
        for c in (os.path.join(ROOT, "build", "perf_analyzer"),
                  os.path.join(ROOT, "build", "venv", "bin", "perf_analyzer")):
            if os.access(c, os.X_OK):
                cands.append(c)
        if not cands:
            return None, "not installed; run scripts/perf-analyzer.sh"
        why = ""
        for c in cands:
            try:
                p = subprocess.run([c, "--help"], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, timeout=60)
            except OSError as e:
                why = "%s: %s" % (c, e)
                continue
            if "perf_analyzer" in p.stdout and "-m" in p.stdout and "not found" not in p.stdout:
                return c, ""
            first = p.stdout.strip().splitlines()[0] if p.stdout.strip() else ""
            why = "%s does not run: %s" % (c, first.replace(c + ": ", "") or
                                           "exit %d" % p.returncode)
        return None, why

    # -- servers --------------------------------------------------------------------------------

    def make_layer(self, n_in, n_out):
        prefix = os.path.join(self.tmp, "layer_%dx%d" % (n_in, n_out))
        if not os.path.exists(prefix + ".safetensors"):
            run([sys.executable, os.path.join(ROOT, "scripts", "make_layer.py"), "--in",
                 str(n_in), "--out", str(n_out), "--rows", "1", prefix], 600)
        return prefix + ".safetensors"

    def wait_ready(self, p, sock, what, log_path):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if p.poll() is not None:
                with open(log_path) as f:
                    raise BenchError("%s exited before it was ready:\n%s" % (what, f.read()[-3000:]))
            r = subprocess.run([self.exe("tpclient"), "--server", sock, "--timeout", "5000",
                                "health"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if r.returncode == 0:
                return
            time.sleep(0.1)
        raise BenchError("%s was not ready after 120 s" % what)

    def start_tpd(self, layer, cpu, max_batch, extra, tcp_port=None, http_port=None):
        name = "tpd%d" % len(os.listdir(self.tmp))
        sock = "unix:" + os.path.join(self.tmp, name + ".sock")
        cmd = [self.exe("tpd"), "--weights", layer, "--model", "layer", "--cpu", str(cpu),
               "--listen", sock, "--metrics-listen", "127.0.0.1:0", "--http-listen",
               "127.0.0.1:%d" % (http_port or 0), "--max-batch", str(max_batch),
               "--log-level", "warn"]
        if tcp_port:
            cmd += ["--listen", "127.0.0.1:%d" % tcp_port]
        cmd += self.a.tpd_args + extra
        log_path = os.path.join(self.tmp, name + ".log")
        p = self.procs.start(cmd, log_path)
        self.wait_ready(p, sock, "tpd (%s)" % " ".join(cmd[1:]), log_path)
        return p, sock

    def start_echo(self, rows, n_in, n_out):
        name = "echo_%dx%dx%d" % (rows, n_in, n_out)
        sock = "unix:" + os.path.join(self.tmp, name + ".sock")
        log_path = os.path.join(self.tmp, name + ".log")
        p = self.procs.start([self.exe("echo_server"), "--listen", sock, "--in", str(n_in),
                              "--out", str(n_out), "--rows", str(rows), "--model", "layer"],
                             log_path)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with open(log_path) as f:
                if "ready" in f.read():
                    return p, sock
            if p.poll() is not None:
                raise BenchError("echo_server exited: %s" % open(log_path).read()[-2000:])
            time.sleep(0.05)
        raise BenchError("echo_server was not ready after 60 s")

    # -- measurements ---------------------------------------------------------------------------

    def warmup_for(self, rows, n_in, n_out):
        # about a second of warm-up at most, at least one call
        return 1 if rows * n_in * n_out > 5e8 else 3

    def bench(self, sock, rows, n_in, n_out, conc, extra=()):
        cmd = [self.exe("tpclient"), "--server", sock, "--timeout", "120000", "bench", "--rows",
               str(rows), "--concurrency", str(conc), "--duration", str(self.a.seconds),
               "--warmup", str(self.warmup_for(rows, n_in, n_out)), "--model", "layer"]
        cmd += list(extra) + self.a.client_args
        return parse_kv(run(cmd, 300 + 10 * self.a.seconds), "bench-result:")

    def sgemm(self, rows, n_in, n_out, threads, ranks=1, gemm="openblas"):
        cmd = [self.exe("gemm_baseline"), "--rows", str(rows), "--in", str(n_in), "--out",
               str(n_out), "--threads", str(threads), "--ranks", str(ranks), "--duration",
               str(self.a.seconds), "--warmup", str(self.warmup_for(rows, n_in, n_out))]
        if gemm != "openblas":
            cmd += ["--gemm", gemm]
        return parse_kv(run(cmd, 300 + 10 * self.a.seconds), "gemm-result:")

    def probe_shm(self, sock, n_in):
        """Whether the tpd on sock serves tensors in system shared memory."""
        if not self.client_shm:
            return False
        if sock not in self.server_shm:
            p = subprocess.run([self.exe("tpclient"), "--server", sock, "bench", "--rows", "1",
                                "--iters", "1", "--warmup", "0", "--shm", "--model", "layer"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               timeout=120)
            self.server_shm[sock] = p.returncode == 0
            if p.returncode != 0 and "UNIMPLEMENTED" not in p.stdout:
                raise BenchError("tpclient bench --shm failed against tpd:\n" + p.stdout[-2000:])
        return self.server_shm[sock]

    def perf(self, port, rows, n_in, n_out, conc, shm=False, stream=False, http=False):
        cmd = [self.perf_analyzer, "-m", "layer", "-i", "http" if http else "grpc",
               "-u", "127.0.0.1:%d" % port,
               # tpd's ModelConfig is a batching model (max_batch_size, dims [in]): the rows go
               # in -b, and --shape names the dims without the batch
               "-b", str(rows), "--shape", "input:%d" % n_in, "--concurrency-range",
               "%d:%d" % (conc, conc), "--measurement-interval",
               str(int(self.a.seconds * 1000)), "--max-trials", "5",
               # its default, 10% between 3 windows in a row, is rarely met on a shared 2-core
               # VM, and then it reports nothing; the rounds' medians are what count here
               "--stability-percentage", "50"]
        if shm:
            cmd += ["--shared-memory", "system", "--output-shared-memory-size",
                    str(rows * n_out * 4)]
        if stream:
            cmd += ["--streaming"]
        try:
            out = run(cmd, 600)
        except BenchError as e:
            # a noisy window on a shared VM: once more, with twice the trials
            if "stable" not in str(e):
                raise
            out = run(cmd[:cmd.index("--max-trials") + 1] + ["10"] +
                      cmd[cmd.index("--max-trials") + 2:], 600)

        def num(pattern):
            m = re.search(pattern, out)
            if not m:
                raise BenchError("cannot read /%s/ in perf_analyzer's output:\n%s" %
                                 (pattern, out[-2000:]))
            return float(m.group(1))
        # its inferences are rows: a request of -b B counts B
        rows_per_s = num(r"Throughput:\s*([0-9.]+)\s*infer/sec")
        return {"rps": rows_per_s / rows, "rows_per_s": rows_per_s,
                "p50_ms": num(r"p50 latency:\s*([0-9.]+)\s*usec") / 1e3,
                "p90_ms": num(r"p90 latency:\s*([0-9.]+)\s*usec") / 1e3,
                "p99_ms": num(r"p99 latency:\s*([0-9.]+)\s*usec") / 1e3}

    def http_json(self, port, rows, n_in, conc):
        """Requests per second and latencies of JSON inferences over conc keep-alive
        connections, for self.a.seconds."""
        import http.client
        import threading
        body = json.dumps({"inputs": [{"name": "input", "shape": [rows, n_in], "datatype": "FP32",
                                       "data": [0.5 + (i % 7) * 0.125 for i in range(rows * n_in)]}]})
        body = body.encode()
        lat, errors = [], []
        stop = time.monotonic() + self.warmup_for(rows, n_in, 1) * 0.2 + self.a.seconds

        def client():
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            try:
                while True:
                    t0 = time.monotonic()
                    if t0 > stop:
                        return
                    c.request("POST", "/v2/models/layer/infer", body,
                              {"Content-Type": "application/json"})
                    r = c.getresponse()
                    data = r.read()
                    if r.status != 200 or not data.startswith(b'{"model_name"'):
                        raise BenchError("REST JSON inference: %d %s" % (r.status, data[:200]))
                    lat.append(time.monotonic() - t0)
            except Exception as e:  # noqa: BLE001 -- reported by the caller
                errors.append(e)
            finally:
                c.close()

        t0 = time.monotonic()
        threads = [threading.Thread(target=client) for _ in range(conc)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
        if errors:
            raise BenchError(str(errors[0]))
        lat.sort()
        q = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))] * 1e3  # noqa: E731
        return {"rps": len(lat) / wall, "rows_per_s": len(lat) * rows / wall, "p50_ms": q(0.5),
                "p90_ms": q(0.9), "p99_ms": q(0.99)}

    def record(self, case, kind, rnd, r, flop):
        row = dict(case=case, kind=kind, round=rnd, rps=r["rps"], rows_per_s=r["rows_per_s"],
                   gflops=r["rps"] * flop * 1e-9, p50_ms=r["p50_ms"], p90_ms=r["p90_ms"],
                   p99_ms=r["p99_ms"])
        self.results.append(row)
        gflops = "%9s" % "-" if kind == "echo" else "%9.2f" % row["gflops"]
        log("  round %d  %-14s %10.1f req/s %12.0f rows/s %s GFLOP/s   p50 %9.3f  p90 %9.3f"
            "  p99 %9.3f ms" % (rnd, kind, row["rps"], row["rows_per_s"], gflops,
                                row["p50_ms"], row["p90_ms"], row["p99_ms"]))

    def na(self, case, kind, why):
        self.results.append(dict(case=case, kind=kind, round=0, na=why))
        log("  %-22s %s" % (kind, why))

    # -- the runs -------------------------------------------------------------------------------

    def run_shapes(self):
        shapes = self.a.shapes
        echo = {}
        for (rows, n_in, n_out) in shapes:
            if (rows, n_in, n_out) not in echo:
                echo[(rows, n_in, n_out)] = self.start_echo(rows, n_in, n_out)[1]
        for cpu in self.a.cpus:
            threads = cpu * max(1, self.cores // cpu)
            layers = sorted({(n_in, n_out) for (_, n_in, n_out) in shapes})
            for (n_in, n_out) in layers:
                if n_out % cpu:
                    log("skipping %d -> %d on --cpu %d: out is not divisible by the ranks" %
                        (n_in, n_out, cpu))
                    continue
                mine = [s for s in shapes if s[1:] == (n_in, n_out)]
                port = free_port() if self.perf_analyzer else None
                http_port = free_port()
                tpd, sock = self.start_tpd(self.make_layer(n_in, n_out), cpu,
                                           max(max(s[0] for s in mine), 1), [], port, http_port)
                blas = None
                if self.has_cpu_gemm:
                    blas = self.start_tpd(self.make_layer(n_in, n_out), cpu,
                                          max(max(s[0] for s in mine), 1),
                                          ["--cpu-gemm", "openblas"])
                shm = self.probe_shm(sock, n_in)
                for (rows, _, _) in mine:
                    case = "%dx%d->%d cpu%d" % (rows, n_in, n_out, cpu)
                    conc = self.a.concurrency or (1 if rows == 1 else 2)
                    flop = 2.0 * rows * n_in * n_out
                    log("%s: concurrency %d, sgemm with %d threads%s" % (
                        case, conc, threads, ", sgemm-ranks with %d x %d" % (
                            cpu, threads // cpu) if cpu > 1 else ""))
                    if not shm:
                        self.na(case, "tpd-shm", NA if not self.client_shm else
                                "n/a (this tpd does not implement system shared memory)")
                    if not self.perf_analyzer:
                        self.na(case, "perf_analyzer", "n/a (%s)" % self.perf_analyzer_why)
                        self.na(case, "perf_analyzer-shm", "n/a (%s)" % self.perf_analyzer_why)
                        self.na(case, "perf_analyzer-stream",
                                "n/a (%s)" % self.perf_analyzer_why)
                        self.na(case, "perf_analyzer-http", "n/a (%s)" % self.perf_analyzer_why)
                    if not blas:
                        self.na(case, "igemm", NA)
                        self.na(case, "tpd-openblas", NA)
                    kinds = ["sgemm"] + (["igemm"] if blas else []) + \
                        (["sgemm-ranks"] if cpu > 1 else []) + \
                        ["echo", "tpd"] + (["tpd-openblas"] if blas else []) + \
                        (["tpd-shm"] if shm else []) + \
                        (["perf_analyzer", "perf_analyzer-shm", "perf_analyzer-stream",
                          "perf_analyzer-http"] if self.perf_analyzer else []) + ["http-json"]
                    for rnd in range(1, self.a.rounds + 1):
                        # rotate the order, so that no kind always runs after the same one
                        k = (rnd - 1) % len(kinds)
                        for kind in kinds[k:] + kinds[:k]:
                            if kind == "sgemm":
                                r = self.sgemm(rows, n_in, n_out, threads)
                            elif kind == "igemm":
                                r = self.sgemm(rows, n_in, n_out, threads, gemm="invariant")
                            elif kind == "sgemm-ranks":
                                r = self.sgemm(rows, n_in, n_out, threads // cpu, cpu)
                            elif kind == "echo":
                                r = self.bench(echo[(rows, n_in, n_out)], rows, n_in, n_out, conc)
                            elif kind == "tpd":
                                r = self.bench(sock, rows, n_in, n_out, conc)
                            elif kind == "tpd-openblas":
                                r = self.bench(blas[1], rows, n_in, n_out, conc)
                            else:
                                # optional rows: a failure is reported in the table, and the
                                # other rows still run
                                try:
                                    if kind == "tpd-shm":
                                        r = self.bench(sock, rows, n_in, n_out, conc, ["--shm"])
                                    elif kind == "http-json":
                                        r = self.http_json(http_port, rows, n_in, conc)
                                    elif kind == "perf_analyzer-http":
                                        r = self.perf(http_port, rows, n_in, n_out, conc,
                                                      http=True)
                                    else:
                                        r = self.perf(port, rows, n_in, n_out, conc,
                                                      kind == "perf_analyzer-shm",
                                                      kind == "perf_analyzer-stream")
                                except BenchError as e:
                                    self.na(case, kind, "failed: %s" % " ".join(
                                        str(e).split())[:300])
                                    kinds.remove(kind)
                                    continue
                            self.record(case, kind, rnd, r, flop)
                self.procs.stop(tpd)
                if blas:
                    self.procs.stop(blas[0])

    def run_batching(self):
        rows, n_in, n_out = 1, self.a.batch_in, self.a.batch_out
        clients, cpu = self.a.batch_clients, self.a.batch_cpu
        case = "batching %d clients x 1x%d->%d cpu%d" % (clients, n_in, n_out, cpu)
        layer = self.make_layer(n_in, n_out)
        log("%s: --batch-delay-us 0 against %d" % (case, self.a.batch_delay_us))
        off_flags = ["--batch-delay-us", "0"] if self.has_batch_delay else []
        variants = [("batch-off", off_flags)]
        if self.has_batch_delay:
            variants.append(("batch-%dus" % self.a.batch_delay_us,
                             ["--batch-delay-us", str(self.a.batch_delay_us)]))
        else:
            self.na(case, "batch-%dus" % self.a.batch_delay_us, NA)
        socks = []
        for kind, flags in variants:
            socks.append((kind, self.start_tpd(layer, cpu, max(clients, 1), flags)))
        flop = 2.0 * rows * n_in * n_out
        for rnd in range(1, self.a.rounds + 1):
            order = socks if rnd % 2 else socks[::-1]
            for kind, (_, sock) in order:
                self.record(case, kind, rnd, self.bench(sock, rows, n_in, n_out, clients), flop)
        for _, (p, _) in socks:
            self.procs.stop(p)

    # -- summary --------------------------------------------------------------------------------

    def rows_of(self, case, kind):
        return [r for r in self.results if r["case"] == case and r["kind"] == kind and "na" not in r]

    def med(self, case, kind, key):
        v = [r[key] for r in self.rows_of(case, kind)]
        return statistics.median(v) if v else None

    def ratio(self, case, num_kind, fn):
        """Median over rounds of fn(row of num_kind, rows of that round by kind)."""
        out = []
        for r in self.rows_of(case, num_kind):
            same = {x["kind"]: x for x in self.results
                    if x["case"] == case and x["round"] == r["round"] and "na" not in x}
            v = fn(r, same)
            if v is not None:
                out.append(v)
        return statistics.median(out) if out else None

    def over(self, case, kind, base, key="rps"):
        """Median over rounds of kind's key / base's key of the same round."""
        return self.ratio(case, kind, lambda r, s: r[key] / s[base][key] if base in s else None)

    def summary(self):
        cases = []
        for r in self.results:
            if r["case"] not in cases:
                cases.append(r["case"])
        log("")
        log("## medians over %d rounds" % self.a.rounds)
        log("| case | kind | req/s | rows/s | GFLOP/s | p50 ms | p90 ms | p99 ms |")
        log("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for case in cases:
            kinds = []
            for r in self.results:
                if r["case"] == case and r["kind"] not in kinds:
                    kinds.append(r["kind"])
            order = ["sgemm", "igemm", "sgemm-ranks", "echo", "tpd", "tpd-openblas", "tpd-shm",
                     "perf_analyzer", "perf_analyzer-shm", "perf_analyzer-stream",
                     "perf_analyzer-http", "http-json", "batch-off"]
            kinds.sort(key=lambda k: order.index(k) if k in order else len(order))
            for kind in kinds:
                na = [r["na"] for r in self.results
                      if r["case"] == case and r["kind"] == kind and "na" in r]
                if na:
                    log("| %s | %s | %s | | | | | |" % (case, kind, na[0]))
                    continue
                m = {k: self.med(case, kind, k) for k in
                     ("rps", "rows_per_s", "gflops", "p50_ms", "p90_ms", "p99_ms")}
                # the echo computes nothing: a GFLOP/s figure would only mislead
                gflops = "-" if kind == "echo" else "%.2f" % m["gflops"]
                log("| %s | %s | %.1f | %.0f | %s | %.3f | %.3f | %.3f |" % (
                    case, kind, m["rps"], m["rows_per_s"], gflops, m["p50_ms"],
                    m["p90_ms"], m["p99_ms"]))
        log("")
        log("## ratios (median of the per-round ratios)")
        log("| case | tpd / sgemm throughput | tpd-shm / sgemm throughput | "
            "tpd p50 / (echo p50 + sgemm p50) | tpd / sgemm-ranks throughput |")
        log("| --- | ---: | ---: | ---: | ---: |")
        self.ratios = {}
        for case in cases:
            if case.startswith("batching"):
                continue
            thr = self.over(case, "tpd", "sgemm")
            shm = self.over(case, "tpd-shm", "sgemm")
            lat = self.ratio(case, "tpd", lambda r, s: r["p50_ms"] / (
                s["echo"]["p50_ms"] + s["sgemm"]["p50_ms"]) if "echo" in s and "sgemm" in s
                else None)
            ranks = self.over(case, "tpd", "sgemm-ranks")
            self.ratios[case] = (thr, shm, lat, ranks)
            shm_na = [r["na"] for r in self.results
                      if r["case"] == case and r["kind"] == "tpd-shm" and "na" in r]
            log("| %s | %s | %s | %s | %s |" % (
                case, fmt(thr), fmt(shm, shm_na[0] if shm_na else "n/a"), fmt(lat),
                fmt(ranks, "- (1 rank: same as sgemm)")))
        log("")
        log("## batch invariance: the invariant GEMM against OpenBLAS (median of the per-round "
            "ratios)")
        log("| invariance cost of case | igemm / sgemm throughput | tpd / tpd-openblas throughput "
            "| tpd p50 / tpd-openblas p50 |")
        log("| --- | ---: | ---: | ---: |")
        self.inv_ratios = {}
        for case in cases:
            if case.startswith("batching"):
                continue
            ig = self.over(case, "igemm", "sgemm")
            thr = self.over(case, "tpd", "tpd-openblas")
            lat = self.over(case, "tpd", "tpd-openblas", "p50_ms")
            self.inv_ratios[case] = (ig, thr, lat)
            log("| %s | %s | %s | %s |" % (case, fmt(ig), fmt(thr), fmt(lat)))
        log("")
        log("## targets")
        for case, (thr, shm, lat, _) in self.ratios.items():
            if case.startswith("2048x1024->4096"):
                log(target("%s: tpd-shm / sgemm throughput" % case, shm, ">=", 0.9))
                log(target("%s: tpd / sgemm throughput" % case, thr, ">=", 0.6))
            if case.startswith("1x1024->4096"):
                log(target("%s: tpd p50 / (echo p50 + sgemm p50)" % case, lat, "<=", 1.5))
        for case, (_, thr, lat) in self.inv_ratios.items():
            if case.startswith("64x4096->4096"):
                log(target("%s: tpd / tpd-openblas throughput" % case, thr, ">=", 0.95))
            if case.startswith("1x1024->4096"):
                log(target("%s: tpd p50 / tpd-openblas p50" % case, lat, "<=", 1.05))
        for case in cases:
            if not case.startswith("batching"):
                continue
            on = [k for k in ("batch-%dus" % self.a.batch_delay_us,) if self.rows_of(case, k)]
            if not on:
                log(target("%s: batching on / off requests/s" % case, None, ">=", 4))
                continue
            v = self.over(case, on[0], "batch-off")
            log(target("%s: batching on / off requests/s" % case, v, ">=", 4))


def fmt(v, none="n/a"):
    return none if v is None else "%.2f" % v


def target(what, v, op, goal):
    if v is None:
        return "- %s: %s (target %s %g)" % (what, NA, op, goal)
    ok = v >= goal if op == ">=" else v <= goal
    return "- %s: %.2f (target %s %g): %s" % (what, v, op, goal, "met" if ok else "NOT met")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def parse_shapes(text):
    out = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)x(\d+)(?:x|->)(\d+)\s*", item)
        if not m or min(int(g) for g in m.groups()) < 1:
            raise argparse.ArgumentTypeError("shape '%s' is not ROWSxINxOUT" % item)
        out.append(tuple(int(g) for g in m.groups()))
    return out


def main():
    ap = argparse.ArgumentParser(
        description="tpd against in-process sgemm and a gRPC echo, same run, same cores.")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 round of 1 s per measurement (about 1-2 minutes)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes, 1 round of 0.2 s: checks that the harness works")
    ap.add_argument("--rounds", type=int, help="rounds per case (default 3)")
    ap.add_argument("--seconds", type=float, help="seconds per measurement (default 3)")
    ap.add_argument("--shapes", type=parse_shapes,
                    help="ROWSxINxOUT,... (default %s)" % FULL_SHAPES)
    ap.add_argument("--cpus", default="1,2", help="tpd --cpu values, comma separated (default 1,2)")
    ap.add_argument("--concurrency", type=int, default=0,
                    help="clients per tpd and echo measurement (default: 1 for 1-row shapes, 2 "
                         "for the others)")
    ap.add_argument("--tpd-args", default="", help="extra tpd flags for every tpd, one string")
    ap.add_argument("--client-args", default="",
                    help="extra 'tpclient bench' flags for every tpd and echo measurement")
    ap.add_argument("--batch-clients", type=int, default=16,
                    help="concurrent batch-1 clients of the batching case (default 16)")
    ap.add_argument("--batch-delay-us", type=int, default=200,
                    help="tpd --batch-delay-us of the batching case's 'on' side (default 200, as tpd)")
    ap.add_argument("--batch-cpu", type=int, default=1, help="tpd --cpu of the batching case")
    ap.add_argument("--no-batching", action="store_true", help="leave out the batching case")
    ap.add_argument("--perf-analyzer", help="path of Triton's perf_analyzer (default: on PATH)")
    ap.add_argument("--build", default=os.path.join(ROOT, "build"), help="build directory")
    ap.add_argument("--json", help="also write every measurement and ratio to this JSON file")
    a = ap.parse_args()
    if a.smoke:
        a.shapes = a.shapes or parse_shapes(SMOKE_SHAPES)
        a.rounds = a.rounds or 1
        a.seconds = a.seconds or 0.2
        a.batch_clients = min(a.batch_clients, 4)
        a.batch_in, a.batch_out = 64, 96
    else:
        a.batch_in, a.batch_out = 1024, 4096
    if a.quick:
        a.rounds = a.rounds or 1
        a.seconds = a.seconds or 1.0
    a.rounds = a.rounds or 3
    a.seconds = a.seconds or 3.0
    a.shapes = a.shapes or parse_shapes(FULL_SHAPES)
    a.cpus = [int(c) for c in a.cpus.split(",") if c.strip()]
    a.tpd_args = shlex.split(a.tpd_args)
    a.client_args = shlex.split(a.client_args)
    if a.rounds < 1 or a.seconds <= 0 or not a.cpus or min(a.cpus) < 1:
        ap.error("--rounds, --seconds and --cpus must be positive")
    h = None
    try:
        h = Harness(a)
        h.report_environment()
        t0 = time.monotonic()
        h.run_shapes()
        if not a.no_batching:
            h.run_batching()
        h.summary()
        log("")
        log("total %.0f s, load %.2f %.2f %.2f at the end" % ((time.monotonic() - t0,) +
                                                             os.getloadavg()))
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"env": {k: os.environ.get(k) for k in ENV_VARS},
                           "results": h.results,
                           "ratios": {c: dict(zip(("tpd_over_sgemm", "shm_over_sgemm",
                                                   "p50_over_echo_plus_sgemm",
                                                   "tpd_over_sgemm_ranks"), v))
                                      for c, v in h.ratios.items()},
                           "invariance": {c: dict(zip(("igemm_over_sgemm", "tpd_over_openblas",
                                                       "p50_over_openblas"), v))
                                          for c, v in h.inv_ratios.items()}}, f, indent=1)
    except BenchError as e:
        print("run.py: error: %s" % e, file=sys.stderr)
        return 1
    finally:
        if h:
            h.procs.stop_all()
            shutil.rmtree(h.tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
