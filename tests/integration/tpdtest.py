"""tpdtest -- the harness behind tpd's integration tests.

Every test runs real processes: tpd (which starts one tpd-worker per rank) and tpclient, talking
over a unix socket in a temporary directory of the test's own. The programs come from the
environment (ctest sets it, see CMakeLists.txt):

    TPD          path of the tpd binary (tpd-worker is found next to it by tpd itself)
    TPCLIENT     path of the tpclient binary
    TP_SEED_DIR  tests/data/seed, the reference cases computed by PyTorch's nn.Linear

A missing variable fails the tests; nothing is skipped silently.

What is here:
  * safetensors writing (F32/F16 through safetensors.numpy, BF16 by a small writer of our own,
    rounding float32 to nearest-even) and reading (all three dtypes, for the seed files),
  * the float64 reference y = x.W^T + b with its magnitude |x|.|W|^T + |b|, and the relative
    error of docs/cli.md: max |y - ref| / mag,
  * Daemon: one tpd process, its log, its readiness, its clean stop, and its reaping,
  * run()/tpclient(): subprocesses that always have a timeout,
  * TpdTestCase: a temporary directory per test, every daemon killed and reaped at the end,
    and the tail of every daemon's log printed when the test failed.
"""

import contextlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import unittest

import numpy as np

TPD = os.environ.get("TPD", "")
TPCLIENT = os.environ.get("TPCLIENT", "")
SEED_DIR = os.environ.get("TP_SEED_DIR", "")

READY_TIMEOUT = 30.0  # seconds tpd may take to become ready
STOP_TIMEOUT = 20.0  # seconds tpd may take to drain and exit after SIGTERM
CLIENT_TIMEOUT = 60.0  # seconds any one tpclient run may take

_counter = itertools.count()

ELEM_SIZE = {"F32": 4, "F16": 2, "BF16": 2}


def check_environment():
    """Raises AssertionError naming what is missing (so the test fails, never skips)."""
    problems = []
    for var, path in (("TPD", TPD), ("TPCLIENT", TPCLIENT)):
        if not path:
            problems.append("%s is not set" % var)
        elif not os.access(path, os.X_OK):
            problems.append("%s=%s is not an executable file" % (var, path))
    if not SEED_DIR:
        problems.append("TP_SEED_DIR is not set")
    elif not os.path.isfile(os.path.join(SEED_DIR, "seed.safetensors")):
        problems.append("TP_SEED_DIR=%s has no seed.safetensors" % SEED_DIR)
    if problems:
        raise AssertionError("integration test environment: " + "; ".join(problems) +
                             " (run through ctest, or set TPD, TPCLIENT and TP_SEED_DIR)")


# ------------------------------------------------------------------------------------------------
# safetensors


def f32_to_bf16_bits(a):
    """float32 array -> uint16 BF16 bit patterns, rounded to nearest, ties to even."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = np.isnan(np.asarray(a, dtype=np.float32))
    rounded = np.where(nan, (bits >> 16) | 0x40, rounded)  # keep NaN a (quiet) NaN
    return rounded.astype(np.uint16)


def bf16_bits_to_f32(h):
    return (np.asarray(h, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def round_to_bf16(a):
    """The float32 value that storing a as BF16 keeps."""
    return bf16_bits_to_f32(f32_to_bf16_bits(a)).reshape(np.shape(a))


def write_safetensors_raw(path, tensors, metadata=None):
    """Writes tensors = [(name, dtype, shape, bytes), ...] in order: 8-byte little-endian header
    length, JSON header padded with spaces to a multiple of 8, then the data."""
    header = {}
    offset = 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, _, _, data in tensors:
            f.write(data)


def read_safetensors(path):
    """Reads every tensor of an F32/F16/BF16 safetensors file as float32: {name: array}."""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        raw = blob[base + a:base + b]
        dt = info["dtype"]
        if dt == "F32":
            arr = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        elif dt == "F16":
            arr = np.frombuffer(raw, dtype="<f2").astype(np.float32)
        elif dt == "BF16":
            arr = bf16_bits_to_f32(np.frombuffer(raw, dtype="<u2"))
        else:
            raise ValueError("%s: tensor %s has dtype %s" % (path, name, dt))
        out[name] = arr.reshape(info["shape"])
    return out


def make_layer(path, out, in_, bias=True, dtype="F32", seed=0, metadata=None):
    """Writes a random layer (weight [out, in_], bias [out] when bias) to path as dtype and
    returns (W, b) as float32 exactly as stored (after rounding for F16/BF16); b is None without
    bias. Values follow nn.Linear's init, U(-1/sqrt(in), 1/sqrt(in))."""
    rng = np.random.default_rng(seed)
    k = 1.0 / np.sqrt(in_)
    W = rng.uniform(-k, k, size=(out, in_)).astype(np.float32)
    b = rng.uniform(-k, k, size=(out,)).astype(np.float32) if bias else None
    if dtype == "F32" or dtype == "F16":
        from safetensors.numpy import save_file
        npdt = np.float32 if dtype == "F32" else np.float16
        tensors = {"weight": W.astype(npdt)}
        if bias:
            tensors["bias"] = b.astype(npdt)
        save_file(tensors, path, metadata=metadata)
        W = tensors["weight"].astype(np.float32)
        b = tensors["bias"].astype(np.float32) if bias else None
    elif dtype == "BF16":
        tensors = [("weight", "BF16", W.shape, f32_to_bf16_bits(W).astype("<u2").tobytes())]
        W = round_to_bf16(W)
        if bias:
            tensors.append(("bias", "BF16", b.shape, f32_to_bf16_bits(b).astype("<u2").tobytes()))
            b = round_to_bf16(b)
        write_safetensors_raw(path, tensors, metadata)
    else:
        raise ValueError("dtype " + dtype)
    return W, b


def seed_case(name, bf16=False):
    """(weights path, x, W, b, y64) of a seed case; W and b as stored, float32."""
    wpath = os.path.join(SEED_DIR, name + (".bf16" if bf16 else "") + ".safetensors")
    t = read_safetensors(wpath)
    x = np.load(os.path.join(SEED_DIR, name + ".x.npy"))
    y64 = np.load(os.path.join(SEED_DIR, name + (".bf16" if bf16 else "") + ".y64.npy"))
    return wpath, x, t["weight"], t.get("bias"), y64


# ------------------------------------------------------------------------------------------------
# reference and error


def reference(x, W, b=None):
    """(ref, mag) in float64: ref = x.W^T + b, mag = |x|.|W|^T + |b|."""
    x64 = np.asarray(x, dtype=np.float64)
    W64 = np.asarray(W, dtype=np.float64)
    ref = x64 @ W64.T
    mag = np.abs(x64) @ np.abs(W64).T
    if b is not None:
        b64 = np.asarray(b, dtype=np.float64)
        ref = ref + b64
        mag = mag + np.abs(b64)
    return ref, mag


_erfc = np.vectorize(math.erfc, otypes=[np.float64])


def act64(name, t):
    """A block's activation by PyTorch's definition, in float64."""
    if name == "silu":
        return t / (1.0 + np.exp(-t))
    if name == "gelu":  # 1 + erf(x) as erfc(-x): no cancellation for t far below 0
        return 0.5 * t * _erfc(-t / math.sqrt(2.0))
    if name == "gelu_tanh":  # 0.5 (1 + tanh(u)) as sigmoid(2u), likewise
        return t / (1.0 + np.exp(-2.0 * math.sqrt(2.0 / math.pi) * (t + 0.044715 * t ** 3)))
    if name == "relu":
        return np.maximum(t, 0.0)
    raise ValueError(name)


def block_reference(x, layers, act, gated):
    """(ref, mag) in float64 of an MLP block, from the formulas: gated layers (gate, up, down):
    down(act(gate(x)) * up(x)); otherwise (fc, proj): proj(act(fc(x))). Each layer is (W [out,
    in], b or None). mag is the scale of a float32 computation's error: down's own |h|.|W|^T + |b|
    plus |W_down| times the intermediate's (|x|.|W|^T of its layers through the activation, and
    |h| for the activation's own rounding; the slope is taken numerically)."""
    x64 = np.asarray(x, dtype=np.float64)
    first = [reference(x64, W, b) for W, b in layers[:-1]]
    (t, mt) = first[0]
    eps = 1e-6 * (1.0 + np.abs(t))
    slope = np.abs(act64(act, t + eps) - act64(act, t - eps)) / (2 * eps)
    if gated:
        (u, mu) = first[1]
        h = act64(act, t) * u
        mh = slope * np.abs(u) * mt + np.abs(act64(act, t)) * mu + np.abs(h)
    else:
        h = act64(act, t)
        mh = slope * mt + np.abs(h)
    Wd, bd = layers[-1]
    ref, mag = reference(h, Wd, bd)
    return ref, mag + mh @ np.abs(np.asarray(Wd, dtype=np.float64)).T


def rel_err(y, ref, mag):
    """max over elements of |y - ref| / mag; where mag == 0: 0 if y == ref, else inf.
    NaN counts as inf. Shapes must match exactly."""
    y = np.asarray(y)
    if y.shape != np.shape(ref):
        raise AssertionError("shape %s, expected %s" % (y.shape, np.shape(ref)))
    if y.size == 0:
        return 0.0
    d = np.abs(y.astype(np.float64) - ref)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(mag > 0, d / np.where(mag > 0, mag, 1.0), np.where(d == 0, 0.0, np.inf))
    r = np.where(np.isnan(r), np.inf, r)
    return float(r.max())


# ------------------------------------------------------------------------------------------------
# processes


class Result:
    def __init__(self, argv, rc, out, err):
        self.argv, self.rc, self.out, self.err = argv, rc, out, err

    def __repr__(self):
        return "%s -> rc %s\n--- stdout:\n%s--- stderr:\n%s" % (
            " ".join(self.argv), self.rc, self.out, self.err)


def run(argv, timeout=CLIENT_TIMEOUT, env=None):
    """Runs argv to completion (killed after timeout, which fails the test) -> Result."""
    argv = [str(a) for a in argv]
    try:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                           env=env)
    except subprocess.TimeoutExpired as e:
        raise AssertionError("%s did not finish within %.0f s (killed); stdout %r stderr %r" % (
            " ".join(argv), timeout, e.stdout, e.stderr))
    return Result(argv, p.returncode, p.stdout.decode(errors="replace"),
                  p.stderr.decode(errors="replace"))


def tpclient(*args, timeout=CLIENT_TIMEOUT):
    return run([TPCLIENT] + list(args), timeout=timeout)


class Background:
    """A process started now and collected later with wait(); killed by kill() if still there."""

    def __init__(self, argv, cwd=None):
        self.argv = [str(a) for a in argv]
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, cwd=cwd)
        self.result = None

    def wait(self, timeout=CLIENT_TIMEOUT):
        if self.result is None:
            try:
                out, err = self.proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError("%s did not finish within %.0f s (killed)" % (
                    " ".join(self.argv), timeout))
            self.result = Result(self.argv, self.proc.returncode, out.decode(errors="replace"),
                                 err.decode(errors="replace"))
        return self.result

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.communicate(timeout=10)
        except (subprocess.TimeoutExpired, ValueError):
            pass


def pid_alive(pid, name=b"tpd-worker"):
    """True while pid is a live (not zombie) process whose command line contains name."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            stat = f.read()
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    state = stat[stat.rfind(b")") + 2:][:1]
    if state in (b"Z", b"X"):
        return False
    return name is None or name in cmdline


def wait_gone(pids, timeout=5.0):
    """Pids still alive (not zombies) after up to timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if pid_alive(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def shm_entries():
    """Names in /dev/shm (tpd's arena is a memfd, so it must never add one)."""
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


def free_tcp_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def one_line_error(testcase, res, prog="tpclient"):
    """Asserts stderr is exactly one line starting 'PROG: error:'."""
    lines = [l for l in res.err.splitlines() if l.strip()]
    testcase.assertEqual(len(lines), 1, "expected one error line on stderr:\n%r" % res)
    testcase.assertTrue(lines[0].startswith(prog + ": error:"),
                        "stderr does not start with '%s: error:':\n%r" % (prog, res))
    return lines[0]


STARTED_RE = re.compile(r"tpd: notice: started worker rank (\d+) pid (\d+)")
LOADED_RE = re.compile(r"tpd-worker rank (\d+): \w+: loaded rows \[(\d+), (\d+)\) of (\d+) from "
                       r"'([^']*)' \((\w+)\): read (\d+) bytes of weight and (\d+) bytes of bias")
ACCEPTED_RE = re.compile(r"tpd: debug: accepted request")
METRICS_RE = re.compile(r"tpd: notice: metrics and health on http://(\S+)/metrics")
HTTP_RE = re.compile(r"tpd: notice: REST API on https?://(\S+)/v2")
SANITIZER_RE = re.compile(r"ERROR: (?:AddressSanitizer|LeakSanitizer)[^\n]*|runtime error: [^\n]*")


def infer_all_at_once(client, model, xs, tag, timeout=90, hold=None, datatype="FP32"):
    """Sends every x of xs as one tritonclient async_infer (request ids TAG-i) before waiting for
    any, then returns [(result, error)] in the order of xs; fails if a request gets no answer
    within timeout. tritonclient calls the callback with result= and error= by name.

    hold: the Daemon (run with --log-level debug) whose workers are stopped (SIGSTOP) until it
    has accepted every request, so that they queue behind at most one job and share the next
    ones however fast the workers are: a fast worker would otherwise end each job before the
    next request arrives, and no batch would form."""
    import threading
    import tritonclient.grpc as tgrpc
    results = [None] * len(xs)
    done = threading.Semaphore(0)

    def callback(i, result, error):
        results[i] = (result, error)
        done.release()

    inps = []
    for x in xs:
        inp = tgrpc.InferInput("input", list(x.shape), datatype)
        inp.set_data_from_numpy(x)
        inps.append(inp)
    accepted = hold.count(ACCEPTED_RE) if hold else 0
    with hold.workers_stopped() if hold else contextlib.nullcontext():
        for i, inp in enumerate(inps):
            client.async_infer(model, [inp], lambda result, error, i=i: callback(i, result, error),
                               request_id="%s-%d" % (tag, i), client_timeout=60)
        if hold:
            wait_for(lambda: hold.count(ACCEPTED_RE) >= accepted + len(xs), 30,
                     "tpd to accept all %d requests" % len(xs), hold)
    for _ in xs:
        if not done.acquire(timeout=timeout):
            raise AssertionError("a request got no answer within %.0f s" % timeout)
    return results


def triton_infer(addr, x, model="m"):
    """One tritonclient.grpc ModelInfer of x (FP32, its own shape) -> the output array."""
    import tritonclient.grpc as tgrpc
    client = tgrpc.InferenceServerClient(url=addr)
    inp = tgrpc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    try:
        return client.infer(model, [inp]).as_numpy("output")
    finally:
        client.close()


def sanitized(pid):
    """True when pid runs with AddressSanitizer (whose quarantine keeps freed memory resident)."""
    with open("/proc/%d/maps" % pid) as f:
        return "libasan" in f.read()


def wait_for(pred, timeout, what, d=None):
    """pred()'s first true value, polled every 50 ms; fails after timeout s, with d's log."""
    deadline = time.monotonic() + timeout
    while True:
        r = pred()
        if r:
            return r
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.0f s waiting for %s\n%s" % (
                timeout, what, d.log_tail() if d else ""))
        time.sleep(0.05)


def rel64(y, y64):
    """max|y - y64| / max|y64|, after checking the shapes."""
    if np.shape(y) != np.shape(y64):
        raise AssertionError("shape %s, expected %s" % (np.shape(y), np.shape(y64)))
    return float(np.max(np.abs(np.asarray(y, np.float64) - y64)) / np.max(np.abs(y64)))


def metadata(d):
    """`tpclient metadata` of daemon d as a dict of its `key: value` lines."""
    res = d.client("metadata")
    if res.rc != 0:
        raise AssertionError("metadata failed: %r" % res)
    return dict(line.split(": ", 1) if ": " in line else (line.rstrip(":"), "")
                for line in res.out.splitlines())


def metric_series(text, name):
    """{labels: value} of one family's samples in a /metrics text ("" for a series without
    labels)."""
    return {m.group(1) or "": float(m.group(2)) for m in
            re.finditer(r"^%s(?:\{([^}]*)\})? (\S+)$" % re.escape(name), text, re.M)}


class Daemon:
    """One tpd. Listens on a unix socket in workdir unless listen is given, and serves its metrics
    on a port the OS picks (--metrics-listen 127.0.0.1:0, unless args set --metrics-listen),
    as it does its REST API (--http-listen); metrics_url() and http_addr() read them from the
    log. weights None leaves --weights out (a config file gives
    it); env adds to or, with None values, removes from tpd's environment. Its stdout and stderr
    go to NAME.log in workdir. start() waits until `tpclient health` says ready (exit 0); stop()
    sends SIGTERM and demands exit 0 within STOP_TIMEOUT; kill() (always called at cleanup) kills
    whatever is left -- tpd's process group (it runs in a session of its own) and any worker it
    logged -- and reaps tpd."""

    def __init__(self, workdir, weights, args=(), name="tpd", listen=None, env=None, log=None):
        self.workdir = workdir
        self.name = name
        self.sock = os.path.join(workdir, name + ".sock")
        self.addr = listen if listen else "unix:" + self.sock
        args = [str(a) for a in args]
        self.argv = [TPD] + (["--weights", weights] if weights is not None else [])
        self.argv += ["--listen", self.addr] + args
        for flag in ("--metrics-listen", "--http-listen"):
            if not any(a == flag or a.startswith(flag + "=") for a in args):
                self.argv += [flag, "127.0.0.1:0"]
        self.env = dict(os.environ)
        for k, v in (env or {}).items():
            if v is None:
                self.env.pop(k, None)
            else:
                self.env[k] = str(v)
        self.log_path = os.path.join(workdir, (log or name) + ".log")
        self.proc = None
        self.logf = None
        self.final_log = None
        self.returncode = None

    # -- life

    def start(self, wait_ready=True, timeout=READY_TIMEOUT):
        self.logf = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self.logf,
                                     stderr=self.logf, start_new_session=True, env=self.env)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout=READY_TIMEOUT):
        """Polls `tpclient health` until it exits 0. Fails if tpd exits or time runs out."""
        t0 = time.monotonic()
        last = None
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise AssertionError("tpd exited with %d before it was ready: %s\n%s" % (
                    rc, " ".join(self.argv), self.log_tail()))
            last = self.client("health", "--timeout", "2000", timeout=10)
            if last.rc == 0:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise AssertionError("tpd not ready after %.0f s; last health check: %r\n%s" % (
                    timeout, last, self.log_tail()))
            time.sleep(0.05)

    def send(self, sig):
        self.proc.send_signal(sig)

    def wait_exit(self, timeout=STOP_TIMEOUT):
        """Waits for tpd to exit -> its status (fails after timeout)."""
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("tpd did not exit within %.0f s (killed)\n%s" % (
                timeout, self.log_tail()))
        return self.returncode

    def stop(self, sig=signal.SIGTERM, timeout=STOP_TIMEOUT):
        """Sends sig and asserts tpd exits 0 within timeout."""
        t0 = time.monotonic()
        self.send(sig)
        rc = self.wait_exit(timeout)
        if rc != 0:
            raise AssertionError("tpd exited with %d after %s, expected 0\n%s" % (
                rc, signal.Signals(sig).name, self.log_tail()))
        return time.monotonic() - t0

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                self.proc.kill()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for pid in self.all_worker_pids():
            if pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        if self.logf:
            self.logf.close()
            self.logf = None
        if self.final_log is None:
            self.final_log = self.log()
            # in a sanitizer build, a report by tpd or any worker (their stderr is this log)
            # fails the test, even when the process that made it was not checked otherwise
            m = SANITIZER_RE.search(self.final_log)
            if m:
                raise AssertionError("sanitizer report in %s's log: %s\n%s" % (
                    self.name, m.group(0), self.log_tail(80)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()
        return False

    # -- log

    def log(self):
        if self.final_log is not None:
            return self.final_log
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines=40):
        text = self.log().splitlines()
        return "--- %s log (%s), last %d of %d lines:\n%s\n---" % (
            self.name, " ".join(self.argv), min(lines, len(text)), len(text),
            "\n".join(text[-lines:]))

    def logged_addr(self, regex, what, timeout=READY_TIMEOUT):
        """The HOST:PORT that regex's line of the log names (waits for it)."""
        deadline = time.monotonic() + timeout
        while True:
            m = regex.search(self.log())
            if m:
                return m.group(1)
            if not self.running() or time.monotonic() > deadline:
                raise AssertionError("no '%s' line in the log\n" % what + self.log_tail())
            time.sleep(0.02)

    def metrics_url(self, timeout=READY_TIMEOUT):
        """http://HOST:PORT of the metrics server, from its log line (waits for it)."""
        return "http://" + self.logged_addr(METRICS_RE, "metrics and health on", timeout)

    def http_addr(self, timeout=READY_TIMEOUT):
        """HOST:PORT of the REST API, from its log line (waits for it)."""
        return self.logged_addr(HTTP_RE, "REST API on", timeout)

    def scrape(self):
        """The text of /metrics."""
        import urllib.request
        with urllib.request.urlopen(self.metrics_url() + "/metrics", timeout=10) as r:
            return r.read().decode()

    def metric(self, name):
        """The value of family name's one series (fails unless it has exactly one)."""
        values = list(metric_series(self.scrape(), name).values())
        if len(values) != 1:
            raise AssertionError("%s has %d series, expected 1" % (name, len(values)))
        return values[0]

    def worker_pids(self):
        """{rank: pid} from the latest 'started worker rank R pid P' line of each rank."""
        return {int(r): int(p) for r, p in STARTED_RE.findall(self.log())}

    @contextlib.contextmanager
    def workers_stopped(self):
        """Stops every worker (SIGSTOP) for a with block -> their pids; the live ones go on
        (SIGCONT) when it ends, whatever happened in it."""
        pids = list(self.worker_pids().values())
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield pids
        finally:
            for pid in pids:
                if pid_alive(pid):
                    os.kill(pid, signal.SIGCONT)

    def all_worker_pids(self):
        return [int(p) for _, p in STARTED_RE.findall(self.log())]

    def loaded(self):
        """[(rank, A, B, OUT, name, dtype, wbytes, bbytes)] from the 'loaded rows' lines."""
        return [(int(r), int(a), int(b), int(o), n, d, int(wb), int(bb))
                for r, a, b, o, n, d, wb, bb in LOADED_RE.findall(self.log())]

    def count(self, regex):
        return len(re.findall(regex, self.log()))

    # -- clients

    def client(self, *args, timeout=CLIENT_TIMEOUT):
        return tpclient("--server", self.addr, *args, timeout=timeout)

    def client_bg(self, *args):
        return Background([TPCLIENT, "--server", self.addr] + list(args))


# ------------------------------------------------------------------------------------------------
# test case


def failure_line(tb):
    """The first line of a traceback's exception: "AssertionError: ..."."""
    lines = tb.rstrip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("  "):
            return lines[i + 1] if i + 1 < len(lines) else lines[-1]
    return lines[-1] if lines else ""


class TpdTestCase(unittest.TestCase):
    """A temporary directory (self.tmp) per test, removed at the end; daemons started through
    start_daemon() are killed and reaped at the end whatever happened, and when the test failed
    the tail of each one's log is printed."""

    @classmethod
    def setUpClass(cls):
        check_environment()

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="tpdtest-")
        self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)
        self.daemons = []

    def path(self, name):
        return os.path.join(self.tmp, name)

    def daemon(self, weights, *args, name=None, listen=None, env=None):
        """A Daemon not yet started, killed at cleanup. A name used before in the test keeps
        its socket path but gets a log of its own (NAME.K.log), so that a failure's report
        shows each daemon's own log."""
        name = name or "tpd%d" % len(self.daemons)
        again = sum(o.name == name for o in self.daemons)
        d = Daemon(self.tmp, weights, args, name=name, listen=listen, env=env,
                   log="%s.%d" % (name, again) if again else None)
        self.daemons.append(d)
        self.addCleanup(d.kill)
        return d

    def start_daemon(self, weights, *args, name=None, listen=None, env=None):
        return self.daemon(weights, *args, name=name, listen=listen, env=env).start()

    def bg(self, argv):
        p = Background(argv)
        self.addCleanup(p.kill)
        return p

    def run(self, result=None):
        nf, ne = (len(result.failures), len(result.errors)) if result is not None else (0, 0)
        res = super().run(result)
        r = result if result is not None else res
        if r is not None and (len(r.failures) > nf or len(r.errors) > ne):
            # what failed first, then the logs: a long report is often read by its first lines
            for _, tb in r.failures[nf:] + r.errors[ne:]:
                print("\n[%s failed] %s" % (self.id(), failure_line(tb)), file=sys.stderr)
            for d in getattr(self, "daemons", []):
                print("\n[%s failed] %s" % (self.id(), d.log_tail(60)), file=sys.stderr)
        return res

    # -- assertions shared by the tests

    def assert_close(self, y, x, W, b, tol=1e-5, what=""):
        """Asserts rel_err(y, reference(x, W, b)) <= tol and returns it."""
        ref, mag = reference(x, W, b)
        self.assertEqual(np.shape(y), ref.shape, "%s: output shape" % what)
        err = rel_err(y, ref, mag)
        self.assertLessEqual(err, tol, "%s: max relative error %.3g > %.3g" % (what, err, tol))
        return err

    def forward(self, d, x, *extra, model=None, name=None):
        """Writes x to an .npy, runs `tpclient forward x.npy -o y.npy` against d, asserts exit 0
        and returns y (float32 as tpclient wrote it)."""
        name = name or "x%d" % next(_counter)
        xin = self.path(name + ".npy")
        yout = self.path(name + ".out.npy")
        np.save(xin, np.ascontiguousarray(x, dtype=np.float32))
        args = ["forward", xin, "-o", yout] + list(extra)
        if model:
            args += ["--model", model]
        res = d.client(*args)
        self.assertEqual(res.rc, 0, "forward failed: %r\n%s" % (res, d.log_tail()))
        y = np.load(yout)
        self.assertEqual(y.dtype, np.float32, "tpclient wrote %s, expected float32" % y.dtype)
        return y
