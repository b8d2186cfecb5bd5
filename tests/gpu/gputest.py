"""gputest -- the harness of the GPU tests, with the standard library only.

GPU machines may lack numpy, tritonclient and the gRPC development packages, so these tests drive
the real programs and judge every answer with `tpclient forward --verify`, which compares against
the independent CPU reference (tests/ref, double accumulation). The programs come from the
environment (ctest sets it, bench/gpu-check.sh too):

    TPD           tpd (tpd-worker is found next to it)
    TPCLIENT      tpclient
    TP_GPU_PROBE  tp_gpu_probe: prints the visible GPUs, or why there are none; absent when tpd
                  was built without the CUDA backend
    TP_GPU_WORKER the worker every tpd runs (--worker); unset: the tpd-worker beside tpd. The
                  tests on the emulated device (tests/cudaemu) set it to tpd-worker-emu, and
                  TPD_CUDA_LIBS to the emulator's cuBLAS and NCCL
    TP_SEED_DIR   the PyTorch seed layers (default tests/data/seed)
    TP_HF_DIR     the Hugging Face checkpoints and their cases (default tests/data/hf)

Layers and inputs are written by scripts/make_layer.py (standard library too). Answers that a
`--verify` cannot judge (checkpoint directories) are read back from .npy files with read_npy and
compared with the stored float64 references.
"""

import array
import ast
import atexit
import math
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import make_layer  # noqa: E402  (scripts/make_layer.py)

TPD = os.environ.get("TPD", "")
TPCLIENT = os.environ.get("TPCLIENT", "")
GPU_PROBE = os.environ.get("TP_GPU_PROBE", "")
GPU_WORKER = os.environ.get("TP_GPU_WORKER", "")
SEED_DIR = os.environ.get("TP_SEED_DIR") or os.path.join(ROOT, "tests", "data", "seed")
HF_DIR = os.environ.get("TP_HF_DIR") or os.path.join(ROOT, "tests", "data", "hf")

SKIP = 77  # ctest's SKIP_RETURN_CODE for the gpu tests
SANITIZER_RE = re.compile(r"ERROR: (?:AddressSanitizer|LeakSanitizer)[^\n]*|runtime error: [^\n]*")

_daemons = []  # every tpd started, killed at exit so that none outlives a test that timed out

# On the emulated device, every misuse it saw (a worker aborting as it stops answers nobody) is
# also appended to this file: Daemon.stop() fails on it, and so does the exit.
FAULTS = None
if GPU_WORKER:
    FAULTS = os.path.join(tempfile.mkdtemp(prefix="tpd-cudaemu-"), "faults")
    os.environ["TPD_CUDAEMU_FAULTS"] = FAULTS


def emulator_faults():
    """What the emulated device reported since the last call ("" when nothing), taken away."""
    if not FAULTS or not os.path.exists(FAULTS):
        return ""
    with open(FAULTS) as f:
        text = f.read()
    os.unlink(FAULTS)
    return text


def _kill_all():
    for d in _daemons:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
    faults = emulator_faults()
    if faults:
        sys.stderr.write("the emulated device saw misuse:\n" + faults)
        sys.stderr.flush()
        os._exit(1)


atexit.register(_kill_all)
# timeout(1) and ctest stop a test with SIGTERM: exit through atexit, not around it
signal.signal(signal.SIGTERM, lambda sig, frame: sys.exit(128 + sig))
READY_TIMEOUT = 180.0  # seconds: CUDA, cuBLAS and NCCL start-up on every rank
RUN_TIMEOUT = 120.0


def require_programs():
    for var, path in (("TPD", TPD), ("TPCLIENT", TPCLIENT)):
        if not path or not os.access(path, os.X_OK):
            sys.exit("gputest: %s=%r is not an executable file" % (var, path))


def probe():
    """(number of visible GPUs, text). 0 GPUs with the reason when none is usable, or when this
    build has no CUDA backend."""
    if not GPU_PROBE or not os.access(GPU_PROBE, os.X_OK):
        return 0, "this build has no CUDA backend (the CUDA toolkit and NCCL were not found)"
    res = subprocess.run([GPU_PROBE], capture_output=True, text=True, timeout=60)
    m = re.search(r"^gpus: (\d+)", res.stdout, re.M)
    if res.returncode == 0 and m and int(m.group(1)) > 0:
        return int(m.group(1)), res.stdout.strip()
    return 0, (res.stdout + res.stderr).strip() or "tp_gpu_probe exited %d" % res.returncode


def skip_without_gpu():
    n, text = probe()
    if n == 0:
        print("SKIPPED: no GPU visible: %s" % text)
        sys.exit(SKIP)
    print(text)
    return n


class Result:
    def __init__(self, rc, out, err):
        self.rc, self.out, self.err = rc, out, err

    def __repr__(self):
        return "rc %s\nstdout: %s\nstderr: %s" % (self.rc, self.out[-3000:], self.err[-3000:])


def run(argv, timeout=RUN_TIMEOUT):
    try:
        p = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return Result(None, e.stdout or "", "timed out after %s s" % timeout)
    return Result(p.returncode, p.stdout, p.stderr)


def tmpdir():
    return tempfile.mkdtemp(prefix="tpd-gpu-")


def write_layer(prefix, in_, out, dtype="F32", bias=True, seed=42):
    """Writes PREFIX.safetensors with make_layer.py; returns its path."""
    argv = [sys.executable, os.path.join(ROOT, "scripts", "make_layer.py"), "--in", in_,
            "--out", out, "--rows", 1, "--dtype", dtype, "--seed", seed, prefix]
    if not bias:
        argv.insert(-1, "--no-bias")
    res = run(argv)
    if res.rc != 0:
        raise RuntimeError("make_layer.py failed: %r" % res)
    return prefix + ".safetensors"


def write_x(path, rows, in_, seed=7):
    import random
    rng = random.Random(seed)
    make_layer.write_npy(path, [rng.gauss(0, 1) for _ in range(rows * in_)], [rows, in_])
    return path


def worker_pids(log):
    return {int(r): int(p) for r, p in re.findall(r"started worker rank (\d+) pid (\d+)", log)}


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not alive
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


class Daemon:
    """One tpd on a unix socket in dir; its stderr goes to a log file. env: variables to add to
    tpd's environment (its workers inherit them)."""

    def __init__(self, dir, name, *args, env=None):
        self.sock = "unix:" + os.path.join(dir, name + ".sock")
        self.log_path = os.path.join(dir, name + ".log")
        self.log_file = open(self.log_path, "w")
        self.argv = [TPD, "--listen", self.sock, "--metrics-listen", "127.0.0.1:0",
                     "--http-listen", "127.0.0.1:0"] + [str(a) for a in args]
        if GPU_WORKER:
            self.argv[1:1] = ["--worker", GPU_WORKER]
        self.proc = subprocess.Popen(self.argv, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, **env) if env else None)
        _daemons.append(self)

    def log(self):
        with open(self.log_path) as f:
            return f.read()

    def client(self, *args, timeout=RUN_TIMEOUT):
        return run([TPCLIENT, "--server", self.sock] + list(args), timeout=timeout)

    def wait_ready(self, timeout=READY_TIMEOUT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("tpd exited %d before it was ready:\n%s" % (
                    self.proc.returncode, self.log()[-4000:]))
            if self.client("health", timeout=30).rc == 0:
                return
            time.sleep(0.05)
        raise AssertionError("tpd not ready after %.0f s:\n%s" % (timeout, self.log()[-4000:]))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("tpd did not stop within 60 s of SIGTERM")
        self.log_file.close()
        faults = emulator_faults()
        if faults:
            raise AssertionError("the emulated device saw misuse:\n%s\ntpd log:\n%s" % (
                faults, self.log()[-3000:]))
        # in a sanitizer build, a report by tpd or a worker (their stderr is this log)
        m = SANITIZER_RE.search(self.log())
        if m:
            raise AssertionError("sanitizer report in the log: %s\n%s" % (
                m.group(0), self.log()[-6000:]))
        return self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log_file.close()


def verify(d, x_path, weights, tolerance):
    """Runs tpclient forward --verify; returns (max rel error, Result). Fails unless ok."""
    res = d.client("forward", x_path, "--verify", weights, "--tolerance", "%g" % tolerance)
    m = re.search(r"max rel error ([0-9.eE+-]+|nan|inf)", res.out)
    if res.rc != 0 or not m:
        raise AssertionError("forward %s against %s (tolerance %g) failed: %r\ntpd log:\n%s" % (
            x_path, weights, tolerance, res, d.log()[-3000:]))
    return float(m.group(1)), res


def split_rows(out, nranks):
    """The rows of each rank, as plan_split gives them: the first out % nranks ranks own one
    more."""
    return [out // nranks + (r < out % nranks) for r in range(nranks)]


def metadata(d):
    """tpclient metadata as a dict of its `key: value` lines."""
    res = d.client("metadata")
    if res.rc != 0:
        raise AssertionError("tpclient metadata failed: %r" % res)
    return dict(line.split(": ", 1) for line in res.out.splitlines() if ": " in line)


def read_npy(path):
    """(shape, values) of a little-endian C-order float16, float32 or float64 .npy file; values
    is a flat sequence of floats."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:6] != b"\x93NUMPY":
        raise AssertionError("%s is not a .npy file" % path)
    if data[6] == 1:
        (hlen,), start = struct.unpack("<H", data[8:10]), 10
    else:
        (hlen,), start = struct.unpack("<I", data[8:12]), 12
    head = ast.literal_eval(data[start:start + hlen].decode("latin1"))
    codes = {"<f2": "e", "<f4": "f", "<f8": "d"}
    if head["descr"] not in codes or head["fortran_order"]:
        raise AssertionError("%s: descr %s fortran_order %s, expected little-endian float in C "
                             "order" % (path, head["descr"], head["fortran_order"]))
    shape = tuple(head["shape"])
    n = 1
    for dim in shape:
        n *= dim
    body = data[start + hlen:]
    size = struct.calcsize(codes[head["descr"]])
    if len(body) != n * size:
        raise AssertionError("%s: %d bytes of data for shape %s" % (path, len(body), shape))
    if codes[head["descr"]] == "e":
        return shape, struct.unpack("<%de" % n, body)
    values = array.array(codes[head["descr"]], body)
    if sys.byteorder != "little":
        values.byteswap()
    return shape, values


def forward_npy(d, x_path, y_path):
    """tpclient forward x_path -o y_path; returns read_npy(y_path). Fails unless it succeeds."""
    res = d.client("forward", x_path, "-o", y_path)
    if res.rc != 0:
        raise AssertionError("forward %s failed: %r\ntpd log:\n%s" % (x_path, res,
                                                                     d.log()[-3000:]))
    return read_npy(y_path)


def rel_error(y, ref):
    """max |y - ref| / max |ref|: the error relative to the output's scale; inf when y holds a
    NaN or an infinity."""
    if not all(math.isfinite(v) for v in y):
        return math.inf
    scale = max(abs(v) for v in ref)
    worst = max(abs(a - b) for a, b in zip(y, ref))
    return worst / scale if scale > 0 else worst
