"""Dynamic batching. 16 tritonclient requests of different batch sizes (1 to 16 rows, each with
its own random input at its own scale) are sent at once, in several waves, to a tpd with a batch
delay, and every answer must be exactly its own rows (relative error <= 1e-5 against float64
NumPy; a row from another request cannot pass). The daemon's debug log has one line per job
("batch of N requests, R rows"): with a delay, jobs of more than one request must appear, and the
requests and rows of all jobs must add up to what was sent; with --batch-delay-us 0 every job
carries exactly one request. At the stop, tpd's summary line counts the same jobs."""

import os
import re
import sys
import time
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tpdtest import TpdTestCase, infer_all_at_once, make_layer, reference, rel_err  # noqa: E402

import tritonclient.grpc as tgrpc  # noqa: E402

TOL = 1e-5
IN, OUT, RANKS, MAX_BATCH = 1024, 2048, 2, 64
CLIENTS, WAVES = 16, 3
BATCH_RE = re.compile(r"tpd: debug: batch of (\d+) requests, (\d+) rows on slot")
SUMMARY_RE = re.compile(r"scheduler: (\d+) jobs for (\d+) requests of (\d+) rows, (\d+) jobs of "
                        r"more than one request")


class TestBatching(TpdTestCase):

    def run_waves(self, d, W, b, seed):
        rng = np.random.default_rng(seed)
        client = tgrpc.InferenceServerClient(url=d.addr)
        self.addCleanup(client.close)
        sent_rows = 0
        worst = 0.0
        for wave in range(WAVES):
            sizes = rng.permutation(np.arange(1, CLIENTS + 1))
            xs = [(rng.standard_normal((int(n), IN)) * (1 + i)).astype(np.float32)
                  for i, n in enumerate(sizes)]
            results = infer_all_at_once(client, "lin", xs, "w%d-c" % wave, hold=d)
            for i, x in enumerate(xs):
                result, error = results[i]
                self.assertIsNone(error, "wave %d client %d: %s" % (wave, i, error))
                y = result.as_numpy("output")
                ref, mag = reference(x, W, b)
                self.assertEqual(y.shape, ref.shape)
                err = rel_err(y, ref, mag)
                worst = max(worst, err)
                self.assertLessEqual(err, TOL, "wave %d client %d (%d rows): relative error %.3g"
                                     % (wave, i, x.shape[0], err))
                sent_rows += x.shape[0]
        return sent_rows, worst

    def jobs(self, d):
        return [(int(n), int(r)) for n, r in BATCH_RE.findall(d.log())]

    def setUp(self):
        super().setUp()
        self.wpath = self.path("lin.safetensors")
        self.W, self.b = make_layer(self.wpath, OUT, IN, bias=True, dtype="F32", seed=3)

    def test_batches_form_with_a_delay(self):
        d = self.start_daemon(self.wpath, "--cpu", RANKS, "--max-batch", MAX_BATCH,
                              "--batch-delay-us", 20000, "--log-level", "debug", name="batch")
        sent_rows, worst = self.run_waves(d, self.W, self.b, 11)
        jobs = self.jobs(d)
        self.assertEqual(sum(n for n, _ in jobs), CLIENTS * WAVES, "requests in jobs")
        self.assertEqual(sum(r for _, r in jobs), sent_rows, "rows in jobs")
        self.assertTrue(all(r <= MAX_BATCH for _, r in jobs), "a job over max-batch: %s" % jobs)
        multi = [n for n, _ in jobs if n > 1]
        self.assertTrue(multi, "no job carried more than one request: %s" % jobs)
        print("delay 20 ms: %d jobs for %d requests, %d batched (largest %d requests); worst "
              "relative error %.2e" % (len(jobs), CLIENTS * WAVES, len(multi), max(multi), worst))
        d.stop()
        m = SUMMARY_RE.search(d.log())
        self.assertIsNotNone(m, "no scheduler summary at stop\n" + d.log_tail())
        self.assertEqual([int(v) for v in m.groups()],
                         [len(jobs), CLIENTS * WAVES, sent_rows, len(multi)])

    def test_no_batches_without_delay(self):
        d = self.start_daemon(self.wpath, "--cpu", RANKS, "--max-batch", MAX_BATCH,
                              "--batch-delay-us", 0, "--log-level", "debug", name="nobatch")
        sent_rows, _ = self.run_waves(d, self.W, self.b, 12)
        jobs = self.jobs(d)
        self.assertEqual(len(jobs), CLIENTS * WAVES)
        self.assertEqual(sorted(set(n for n, _ in jobs)), [1])
        self.assertEqual(sum(r for _, r in jobs), sent_rows)
        d.stop()


if __name__ == "__main__":
    unittest.main(verbosity=2)
