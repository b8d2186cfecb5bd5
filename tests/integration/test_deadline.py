"""Deadlines and cancellation. One tpd with one slot (--slots 1), so requests queue behind each
other, and a layer big enough that a 256-row job takes a while (in 1024, out 4096, 1 rank).

* A request whose gRPC deadline (tritonclient's client_timeout) passes while it waits in the queue
  fails with DEADLINE_EXCEEDED and never runs: every batch the daemon logs (debug level) has the
  blockers' 256 rows, none the 3 rows of the timed-out requests.
* A client process that queued 16 requests and is then killed with SIGKILL: its queued calls are
  cancelled at once (the daemon logs each one as cancelled and runs far fewer than 16 jobs for
  it), and another client is served right after, with a correct answer.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tpdtest import TpdTestCase, make_layer, reference, rel_err, wait_for  # noqa: E402

import tritonclient.grpc as tgrpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

TOL = 1e-5
IN, OUT, ROWS = 1024, 4096, 256
BLOCKERS = 12
BATCH_RE = re.compile(r"tpd: debug: batch of (\d+) requests, (\d+) rows on slot")

VICTIM = r"""
import sys, time
import numpy as np
import tritonclient.grpc as tgrpc
url, n, rows, in_ = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
c = tgrpc.InferenceServerClient(url=url)
x = np.ones((rows, in_), dtype=np.float32)
for i in range(n):
    inp = tgrpc.InferInput("input", [rows, in_], "FP32")
    inp.set_data_from_numpy(x)
    c.async_infer("lin", [inp], lambda r, e: None, request_id="victim-%d" % i)
print("sent", flush=True)
time.sleep(600)
"""


def infer_input(x):
    inp = tgrpc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


class TestDeadline(TpdTestCase):

    def setUp(self):
        super().setUp()
        self.wpath = self.path("lin.safetensors")
        self.W, self.b = make_layer(self.wpath, OUT, IN, bias=True, dtype="F32", seed=5)
        self.d = self.start_daemon(self.wpath, "--cpu", 1, "--slots", 1, "--max-batch", ROWS,
                                   "--batch-delay-us", 0, "--log-level", "debug", name="dl")
        self.client = tgrpc.InferenceServerClient(url=self.d.addr)
        self.addCleanup(self.client.close)
        self.rng = np.random.default_rng(8)

    def batches(self):
        return [(int(n), int(r)) for n, r in BATCH_RE.findall(self.d.log())]

    def check(self, y, x):
        ref, mag = reference(x, self.W, self.b)
        err = rel_err(y, ref, mag)
        self.assertLessEqual(err, TOL, "relative error %.3g\n%s" % (err, self.d.log_tail()))

    def test_queued_request_past_deadline_is_dropped(self):
        # keep the one slot busy: BLOCKERS requests of 256 rows, sent at once
        xb = self.rng.standard_normal((ROWS, IN)).astype(np.float32)
        results, lock = [], threading.Lock()

        def done(result, error):
            with lock:
                results.append((result, error))

        late, late_done = [None] * 3, threading.Semaphore(0)

        def late_cb(i, result, error):
            late[i] = (result, error)
            late_done.release()

        for i in range(BLOCKERS):
            self.client.async_infer("lin", [infer_input(xb)], done, request_id="blocker-%d" % i)
        # the first blocker runs; the worker is stopped until the late requests are over, so
        # that they queue behind the other blockers however fast the jobs are
        wait_for(self.batches, 30, "the first blocker's job", self.d)
        with self.d.workers_stopped():
            wait_for(lambda: self.d.count(r"accepted request 'blocker-") == BLOCKERS, 30,
                     "every blocker in the queue", self.d)
            # three short requests at once, each with a 50 ms deadline, behind the blockers
            for i in range(3):
                x = self.rng.standard_normal((3, IN)).astype(np.float32)
                self.client.async_infer("lin", [infer_input(x)],
                                        lambda result, error, i=i: late_cb(i, result, error),
                                        request_id="late-%d" % i, client_timeout=0.05)
            for _ in range(3):
                self.assertTrue(late_done.acquire(timeout=60), "a late request got no answer")
            # tpd drops them from its queue at their deadline, the slot still busy
            wait_for(lambda: self.d.count(r"request 'late-\d' failed") == 3, 30,
                     "tpd to drop the 3 late requests", self.d)
        codes = [e.status() if e is not None else "OK" for _, e in late]
        self.assertEqual(codes, ["StatusCode.DEADLINE_EXCEEDED"] * 3)
        t0 = time.monotonic()
        while len(results) < BLOCKERS and time.monotonic() - t0 < 60:
            time.sleep(0.02)
        self.assertEqual(len(results), BLOCKERS, "blockers did not all finish")
        for result, error in results:
            self.assertIsNone(error, str(error))
            self.check(result.as_numpy("output"), xb)
        # the server saw the late requests and dropped them before they ran
        log = self.d.log()
        for i in range(3):
            self.assertRegex(log, r"request 'late-%d' failed: (deadline exceeded|call cancelled)"
                             % i)
        rows = [r for _, r in self.batches()]
        self.assertEqual(rows, [ROWS] * BLOCKERS,
                         "a batch ran other rows than the blockers' 256: %s" % rows)
        # and still serves
        x = self.rng.standard_normal((2, IN)).astype(np.float32)
        y = self.client.infer("lin", [infer_input(x)]).as_numpy("output")
        self.check(y, x)
        self.d.stop()

    def test_killed_client_frees_the_queue(self):
        victim = self.bg([sys.executable, "-c", VICTIM, self.d.addr, 16, ROWS, IN])
        line = victim.proc.stdout.readline()
        self.assertEqual(line.strip(), b"sent", "victim client did not start")
        t0 = time.monotonic()
        while self.d.count(r"accepted request 'victim-") < 16 and time.monotonic() - t0 < 30:
            time.sleep(0.01)
        self.assertEqual(self.d.count(r"accepted request 'victim-"), 16,
                         "not every victim request arrived\n" + self.d.log_tail())
        # the worker is stopped across the kill, so that no job can end meanwhile: what runs
        # after it is what the cancels did not stop
        with self.d.workers_stopped():
            ran_before = len(self.batches())
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait(timeout=10)
            # every victim request still queued is cancelled; the one in the stopped job stays
            wait_for(lambda: self.d.count(r"request 'victim-\d+' failed: call cancelled") >=
                     16 - ran_before - 1, 30, "the queued victim requests to be cancelled",
                     self.d)
        wait_for(lambda: self.d.count(r"request 'victim-\d+' failed: call cancelled") +
                 len(self.batches()) >= 16, 30, "every victim request to end", self.d)
        cancelled = self.d.count(r"request 'victim-\d+' failed: call cancelled")
        ran = len(self.batches())
        self.assertGreaterEqual(cancelled, 16 - ran,
                                "victim requests neither ran nor were cancelled\n" +
                                self.d.log_tail())
        self.assertLessEqual(ran, ran_before + 1,
                             "jobs kept running for a client that was gone: %d before the kill, "
                             "%d after\n%s" % (ran_before, ran, self.d.log_tail()))
        print("victim: %d jobs ran before the kill, %d in all; %d requests cancelled" % (
            ran_before, ran, cancelled))
        # another client is served at once, correctly
        x = self.rng.standard_normal((5, IN)).astype(np.float32)
        y = self.client.infer("lin", [infer_input(x)], client_timeout=30).as_numpy("output")
        self.check(y, x)
        self.assertLessEqual(len(self.batches()), ran_before + 3)
        self.d.stop()
        self.assertIn("draining 0 requests", self.d.log())


if __name__ == "__main__":
    unittest.main(verbosity=2)
