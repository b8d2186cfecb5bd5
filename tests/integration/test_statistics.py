"""Triton's statistics, as Triton's own client reads them: ModelStatistics through
tritonclient.grpc's get_inference_statistics, and the nv_inference_* families of /metrics.

One client sends requests of known sizes one at a time (so each is its own job), one request
that fails validation, and one for another model; then every count must be exactly what was
sent: successes and failures, rows (inference_count), jobs (execution_count), the queue and
compute counts, one batch_stats entry per batch size with its jobs, and the same numbers in the
Prometheus families, labelled model and version as Triton labels them. The durations must be
positive and add up: a request's queue, input, infer and output times lie within its whole
duration. Unknown models are NOT_FOUND.

Then Prometheus's own promtool (Debian's prometheus package, scripts/deps.sh) reads the whole
exposition: it must parse it, and its lint must find nothing in tpd's own families. It does flag
Triton's names (a counter without _total, "_us", a gauge ending in _count): those names are
Triton's, kept exactly so that Triton's dashboards work, and nothing else may be flagged.
"""

import os
import shutil
import subprocess
import sys
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tpdtest import TpdTestCase, make_layer, metric_series, reference, rel_err  # noqa: E402

import tritonclient.grpc as tgrpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

IN, OUT = 40, 24
MODEL = "stats"
SIZES = [1, 3, 3, 5, 1, 8, 3]
TRITON_NAMES = {"nv_inference_request_success", "nv_inference_request_failure",
                "nv_inference_count", "nv_inference_exec_count",
                "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
                "nv_inference_compute_input_duration_us", "nv_inference_compute_infer_duration_us",
                "nv_inference_compute_output_duration_us", "nv_inference_pending_request_count"}


class TestStatistics(TpdTestCase):

    def test_counts_and_durations(self):
        wpath = self.path(MODEL + ".safetensors")
        W, b = make_layer(wpath, OUT, IN, seed=5)
        d = self.start_daemon(wpath, "--cpu", 2, "--max-batch", 8)
        client = tgrpc.InferenceServerClient(url=d.addr)
        self.addCleanup(client.close)
        rng = np.random.default_rng(1)
        empty = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
        self.assertEqual(empty["name"], MODEL)
        self.assertNotIn("inference_count", empty)  # proto3 JSON leaves out zeros
        for rows in SIZES:
            x = rng.standard_normal((rows, IN)).astype(np.float32)
            inp = tgrpc.InferInput("input", [rows, IN], "FP32")
            inp.set_data_from_numpy(x)
            y = client.infer(MODEL, [inp]).as_numpy("output")
            ref, mag = reference(x, W, b)
            self.assertLessEqual(rel_err(y, ref, mag), 1e-5)
        bad = tgrpc.InferInput("input", [2, IN + 1], "FP32")
        bad.set_data_from_numpy(np.zeros((2, IN + 1), np.float32))
        with self.assertRaises(InferenceServerException):
            client.infer(MODEL, [bad])
        with self.assertRaises(InferenceServerException):
            client.infer("nosuch", [bad])

        st = client.get_inference_statistics(MODEL, as_json=True)["model_stats"]
        self.assertEqual(len(st), 1)
        st = st[0]
        n = len(SIZES)
        self.assertEqual((st["name"], st["version"]), (MODEL, "1"))
        self.assertEqual(int(st["inference_count"]), sum(SIZES))
        self.assertEqual(int(st["execution_count"]), n)
        self.assertGreater(int(st["last_inference"]), 1.7e12)  # ms since the epoch
        inf = st["inference_stats"]
        for key in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
            self.assertEqual(int(inf[key]["count"]), n, key)
            self.assertGreater(int(inf[key]["ns"]), 0, key)
        self.assertEqual(int(inf["fail"]["count"]), 1)
        parts = sum(int(inf[k]["ns"]) for k in ("queue", "compute_input", "compute_infer",
                                                "compute_output"))
        self.assertLessEqual(parts, int(inf["success"]["ns"]),
                             "the parts of the requests take longer than the requests")
        by_size = {int(bs["batch_size"]): bs for bs in st["batch_stats"]}
        self.assertEqual(sorted(by_size), sorted(set(SIZES)))
        for size, bs in by_size.items():
            for key in ("compute_input", "compute_infer", "compute_output"):
                self.assertEqual(int(bs[key]["count"]), SIZES.count(size), (size, key))
                self.assertGreater(int(bs[key]["ns"]), 0, (size, key))
        # every model (no name) is the one model; an unknown one is not found
        every = client.get_inference_statistics(as_json=True)["model_stats"]
        self.assertEqual([m["name"] for m in every], [MODEL])
        with self.assertRaises(InferenceServerException) as cm:
            client.get_inference_statistics("nosuch")
        self.assertIn("NOT_FOUND", str(cm.exception.status()))

        text = d.scrape()
        label = 'model="%s",version="1"' % MODEL
        want = {"nv_inference_request_success": n, "nv_inference_request_failure": 1,
                "nv_inference_count": sum(SIZES), "nv_inference_exec_count": n,
                "nv_inference_pending_request_count": 0}
        for name, v in want.items():
            self.assertEqual(metric_series(text, name), {label: v}, name)
        for name, key in (("nv_inference_queue_duration_us", "queue"),
                          ("nv_inference_compute_infer_duration_us", "compute_infer")):
            self.assertEqual(metric_series(text, name), {label: int(inf[key]["ns"]) // 1000},
                             name)
        self.assertRegex(text, r"# TYPE nv_inference_pending_request_count gauge")
        self.check_promtool(text)
        d.stop()

    def check_promtool(self, text):
        promtool = shutil.which("promtool")
        self.assertIsNotNone(promtool, "promtool is not installed (Debian's prometheus package, "
                             "which scripts/deps.sh installs)")
        p = subprocess.run([promtool, "check", "metrics"], input=text, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=60)
        # 0: clean; 3: lint problems only; anything else: the exposition did not parse
        self.assertIn(p.returncode, (0, 3), "promtool could not read /metrics:\n" + p.stdout)
        problems = [ln for ln in p.stdout.splitlines() if ln.strip()]
        ours = [ln for ln in problems if not ln.startswith("nv_inference_")]
        self.assertEqual(ours, [], "promtool flags tpd's own families:\n" + p.stdout)
        self.assertTrue(all(ln.split()[0] in TRITON_NAMES for ln in problems), p.stdout)
        print("promtool check metrics: %d lint notes, all on Triton's own names" % len(problems))


if __name__ == "__main__":
    unittest.main(verbosity=2)
