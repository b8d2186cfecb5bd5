"""loadgen -- closed-loop ModelInfer load for the reliability tests and the soak script.

Each client is a thread with its own tritonclient.grpc connection that sends ModelInfer requests
one after another, with a random batch size each, and checks every answer against the float64
NumPy reference (tpdtest.reference / rel_err). Every request is recorded: start and end time
(monotonic), batch, and its outcome -- "OK", "WRONG" (an answer that fails the check: never
allowed), or the gRPC status name of a failure ("UNAVAILABLE", ...). A request has a deadline
(timeout), so a hang shows up as DEADLINE_EXCEEDED, and stop() fails if a thread does not end.

Each client draws its inputs from a pool of its own (pool inputs, references computed before the
run starts), so that the clients spend their time waiting on the server, not in NumPy: requests
are in flight nearly all the time, which is what a kill must hit.
"""

import collections
import threading
import time

import numpy as np

import tritonclient.grpc as tgrpc
from tritonclient.utils import InferenceServerException

from tpdtest import reference, rel_err


class Record:
    __slots__ = ("t0", "t1", "rows", "outcome", "detail")

    def __init__(self, t0, t1, rows, outcome, detail=""):
        self.t0, self.t1, self.rows, self.outcome, self.detail = t0, t1, rows, outcome, detail


def status_name(exc):
    """'UNAVAILABLE' from an InferenceServerException (its status() is 'StatusCode.X')."""
    s = exc.status() or ""
    return s.split(".")[-1] if s else "UNKNOWN"


class Load:
    """clients threads against url (tritonclient form: 'unix:PATH' or 'HOST:PORT'), model W, b
    (float32), batch sizes drawn from batches. Tolerance tol on the relative error. A model that
    is not one layer gives ref, x -> (ref, mag), and its input width as W's second dim (W may
    then be any array of that shape)."""

    def __init__(self, url, model, W, b, clients=4, batches=(1, 2, 7, 16, 33, 64), seed=0,
                 timeout=60.0, tol=1e-5, pause_after_failure=0.02, pool=8, ref=None):
        self.url, self.model, self.W, self.b = url, model, W, b
        self.ref = ref or (lambda x: reference(x, self.W, self.b))
        self.clients, self.batches, self.seed = clients, list(batches), seed
        self.timeout, self.tol, self.pause, self.pool = timeout, tol, pause_after_failure, pool
        self.records = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = []
        self.errors = []  # exceptions that are not gRPC statuses (bugs in the test itself)
        self.inflight = 0  # requests sent and not answered yet
        self.pools = [self.make_pool(i) for i in range(clients)]

    def make_pool(self, i):
        """[(x, ref, mag)] of client i: random batches, a distinct scale per input, so that rows
        of another request cannot pass the check."""
        rng = np.random.default_rng(self.seed * 1000 + i)
        pool = []
        for _ in range(self.pool):
            rows = int(rng.choice(self.batches))
            x = (rng.standard_normal((rows, self.W.shape[1])) * rng.uniform(0.5, 4))
            x = x.astype(np.float32)
            ref, mag = self.ref(x)
            pool.append((x, ref, mag))
        return pool

    def start(self):
        for i in range(self.clients):
            t = threading.Thread(target=self.run, args=(i,), daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def run(self, i):
        rng = np.random.default_rng(self.seed * 1000 + i + 500)
        pool = self.pools[i]
        try:
            client = tgrpc.InferenceServerClient(url=self.url)
        except Exception as e:  # noqa: BLE001
            self.errors.append("client %d: %r" % (i, e))
            return
        try:
            while not self.stopping.is_set():
                x, ref, mag = pool[int(rng.integers(len(pool)))]
                rows = x.shape[0]
                inp = tgrpc.InferInput("input", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                with self.lock:
                    self.inflight += 1
                t0 = time.monotonic()
                try:
                    r = client.infer(self.model, [inp], client_timeout=self.timeout)
                    t1 = time.monotonic()
                    y = r.as_numpy("output")
                    if y is None or y.shape != ref.shape:
                        rec = Record(t0, t1, rows, "WRONG", "shape %s, expected %s" % (
                            None if y is None else y.shape, ref.shape))
                    else:
                        err = rel_err(y, ref, mag)
                        rec = Record(t0, t1, rows, "OK" if err <= self.tol else "WRONG",
                                     "" if err <= self.tol else "relative error %.3g" % err)
                except InferenceServerException as e:
                    rec = Record(t0, time.monotonic(), rows, status_name(e), e.message())
                with self.lock:
                    self.inflight -= 1
                    self.records.append(rec)
                if rec.outcome != "OK":
                    time.sleep(self.pause)
        except Exception as e:  # noqa: BLE001
            self.errors.append("client %d: %r" % (i, e))
        finally:
            client.close()

    def wait_inflight(self, n, timeout=10.0):
        """Waits until at least n requests are in flight; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.inflight >= n:
                    return True
            time.sleep(0.001)
        return False

    def stop(self, timeout=None):
        """Stops the clients; returns the names of threads that did not end (hung)."""
        self.stopping.set()
        limit = time.monotonic() + (timeout if timeout is not None else self.timeout + 30)
        hung = []
        for i, t in enumerate(self.threads):
            t.join(max(0.0, limit - time.monotonic()))
            if t.is_alive():
                hung.append("client %d" % i)
        return hung

    # -- what happened

    def snapshot(self):
        with self.lock:
            return list(self.records)

    def count(self, outcome=None, since=None):
        recs = self.snapshot()
        return sum(1 for r in recs if (outcome is None or r.outcome == outcome) and
                   (since is None or r.t0 >= since))

    def wait_ok(self, n, since=None, timeout=60.0):
        """Waits until n requests started at or after since succeeded; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count("OK", since) >= n:
                return True
            time.sleep(0.02)
        return False

    def outcomes(self):
        return collections.Counter(r.outcome for r in self.snapshot())

    def wrong(self):
        return [r for r in self.snapshot() if r.outcome == "WRONG"]

    def in_flight_at(self, t):
        """Records of requests that were in flight at time t."""
        return [r for r in self.snapshot() if r.t0 < t < r.t1]
