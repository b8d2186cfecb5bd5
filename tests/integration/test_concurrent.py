"""Concurrent clients: one tpd (2 ranks, in 64, out 96, bias), 16 `tpclient forward` processes
started at once, each with its own random input (batch 1..64) and its own output file. Every
answer must be its own input's answer (relative error <= 1e-5): requests that are batched or
computed side by side must not get each other's rows. Then a second wave, to show the daemon
is still serving, and a clean stop."""

import os
import re
import sys
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tpdtest import TpdTestCase, make_layer, reference, rel_err  # noqa: E402

TOL = 1e-5
CLIENTS = 16


class TestConcurrent(TpdTestCase):

    def wave(self, d, W, b, rng, tag):
        in_ = W.shape[1]
        batches = rng.permutation(np.concatenate([[1, 64], rng.integers(1, 65, CLIENTS - 2)]))
        jobs = []
        for i, rows in enumerate(batches):
            # distinct scales so that a row answered from another request cannot pass
            x = (rng.standard_normal((int(rows), in_)) * (1 + i)).astype(np.float32)
            xin = self.path("%s-x%02d.npy" % (tag, i))
            yout = self.path("%s-y%02d.npy" % (tag, i))
            np.save(xin, x)
            jobs.append((x, yout, xin))
        procs = [d.client_bg("forward", xin, "-o", yout) for _, yout, xin in jobs]
        for p in procs:
            self.addCleanup(p.kill)
        worst = 0.0
        failures = []
        for i, ((x, yout, _), p) in enumerate(zip(jobs, procs)):
            res = p.wait(timeout=120)
            if res.rc != 0:
                failures.append("client %d (batch %d): %r" % (i, x.shape[0], res))
                continue
            y = np.load(yout)
            ref, mag = reference(x, W, b)
            if y.shape != ref.shape:
                failures.append("client %d: shape %s, expected %s" % (i, y.shape, ref.shape))
                continue
            err = rel_err(y, ref, mag)
            worst = max(worst, err)
            if err > TOL:
                failures.append("client %d (batch %d): relative error %.3g" % (
                    i, x.shape[0], err))
        self.assertEqual(failures, [], "%s: %d of %d clients wrong:\n%s\n%s" % (
            tag, len(failures), CLIENTS, "\n".join(failures), d.log_tail()))
        print("%s: %d concurrent clients, batches %s, worst relative error %.3e" % (
            tag, CLIENTS, sorted(int(r) for r in batches), worst))
        return worst

    def test_sixteen_clients(self):
        wpath = self.path("conc.safetensors")
        W, b = make_layer(wpath, 96, 64, bias=True, dtype="F32", seed=21)
        d = self.start_daemon(wpath, "--cpu", 2, name="conc")
        pids = d.worker_pids()
        rng = np.random.default_rng(2024)
        self.wave(d, W, b, rng, "wave1")
        self.wave(d, W, b, rng, "wave2")
        self.assertEqual(d.worker_pids(), pids, "workers were restarted during the test")
        self.assertIsNone(re.search(r"tpd[^:\n]*: error:", d.log()),
                          "tpd logged errors while serving valid requests\n" + d.log_tail())
        d.stop()


if __name__ == "__main__":
    unittest.main(verbosity=2)
