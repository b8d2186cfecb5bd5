"""System shared memory (Triton's extension). One tpd (in 48, out 40, 2 ranks, --max-batch 8).

* tritonclient with its own shared-memory utilities (tritonclient.utils.shared_memory): input and
  output in registered regions, at offsets; the response has no raw data (one empty
  raw_output_contents entry for the output, as Triton sends) and the output region holds the
  answer (checked against float64 NumPy); region status lists what was registered;
  requests with the input in shared memory and the output in the message, and the reverse.
* Bad bounds and bad parameters get INVALID_ARGUMENT (or NOT_FOUND for an unknown region or
  object), and the daemon keeps serving with the same workers.
* CUDA shared memory: tpd has none; unregistering it (all, as perf_analyzer does at exit, or an
  unknown name, as for system regions) succeeds, and registering is UNIMPLEMENTED.
* A hostile client shrinks its objects (ftruncate to 0) while its requests wait in the queue
  behind long jobs, one with its output in a region and one with its input in one: each of the
  two gets INVALID_ARGUMENT saying the object shrank, tpd and its workers live on (a mapping would
  have ended tpd by SIGBUS), and every other request is answered correctly.
* `tpclient forward --shm` gives the same answer as without, over several requests (rows above
  max-batch), and leaves nothing in /dev/shm.
"""

import os
import signal
import sys
import time
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpdtest  # noqa: E402
from tpdtest import TpdTestCase, make_layer, reference, rel_err  # noqa: E402

import tritonclient.grpc as tgrpc  # noqa: E402
import tritonclient.utils.shared_memory as shm  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

TOL = 1e-5
IN, OUT, RANKS, MAX_BATCH = 48, 40, 2, 8


class TestShm(TpdTestCase):

    def setUp(self):
        super().setUp()
        self.wpath = self.path("lin.safetensors")
        self.W, self.b = make_layer(self.wpath, OUT, IN, bias=True, dtype="F32", seed=17)
        self.d = self.start_daemon(self.wpath, "--cpu", RANKS, "--max-batch", MAX_BATCH,
                                   name="shm")
        self.client = tgrpc.InferenceServerClient(url=self.d.addr)
        self.addCleanup(self.client.close)
        self.rng = np.random.default_rng(4)
        self.tag = "tpdtest%d" % os.getpid()

    def region(self, name, size):
        key = "/%s-%s" % (self.tag, name)
        h = shm.create_shared_memory_region(name, key, size)
        self.addCleanup(shm.destroy_shared_memory_region, h)
        return h, key

    def check(self, y, x, what):
        ref, mag = reference(x, self.W, self.b)
        self.assertEqual(y.shape, ref.shape, what)
        err = rel_err(y, ref, mag)
        self.assertLessEqual(err, TOL, "%s: relative error %.3g" % (what, err))

    def status_code(self, fn, *args, **kw):
        with self.assertRaises(InferenceServerException) as cm:
            fn(*args, **kw)
        return cm.exception.status(), cm.exception.message()

    def test_tritonclient_regions(self):
        md = self.client.get_server_metadata()
        self.assertIn("system_shared_memory", list(md.extensions))
        rows = 5
        in_bytes, out_bytes = rows * IN * 4, rows * OUT * 4
        # input at offset 128 of its region; output at offset 256 of its own
        h_in, k_in = self.region("in", 128 + in_bytes)
        h_out, k_out = self.region("out", 256 + out_bytes)
        self.client.register_system_shared_memory("in", k_in, 128 + in_bytes)
        self.client.register_system_shared_memory("out", k_out, 256 + out_bytes)
        st = self.client.get_system_shared_memory_status()
        self.assertEqual(sorted(st.regions.keys()), ["in", "out"])
        self.assertEqual(st.regions["in"].key, k_in)
        self.assertEqual(st.regions["out"].byte_size, 256 + out_bytes)
        for i in range(3):
            x = (self.rng.standard_normal((rows, IN)) * (1 + i)).astype(np.float32)
            shm.set_shared_memory_region(h_in, [x], offset=128)
            inp = tgrpc.InferInput("input", [rows, IN], "FP32")
            inp.set_shared_memory("in", in_bytes, offset=128)
            out = tgrpc.InferRequestedOutput("output")
            out.set_shared_memory("out", out_bytes, offset=256)
            res = self.client.infer("lin", [inp], outputs=[out])
            resp = res.get_response()
            # one empty entry for the output, as Triton sends: C++ clients index by output
            self.assertEqual(list(resp.raw_output_contents), [b""],
                             "response carried the output data too, or no entry for it")
            self.assertEqual([o.name for o in resp.outputs], ["output"])
            self.assertEqual(list(resp.outputs[0].shape), [rows, OUT])
            y = shm.get_contents_as_numpy(h_out, np.float32, [rows, OUT], offset=256)
            self.check(y, x, "input and output in shared memory, round %d" % i)
        # input in shared memory, output in the message
        x = self.rng.standard_normal((rows, IN)).astype(np.float32)
        shm.set_shared_memory_region(h_in, [x], offset=128)
        inp = tgrpc.InferInput("input", [rows, IN], "FP32")
        inp.set_shared_memory("in", in_bytes, offset=128)
        self.check(self.client.infer("lin", [inp]).as_numpy("output"), x, "input in shm")
        # input in the message, output in shared memory
        x = self.rng.standard_normal((rows, IN)).astype(np.float32)
        inp = tgrpc.InferInput("input", [rows, IN], "FP32")
        inp.set_data_from_numpy(x)
        out = tgrpc.InferRequestedOutput("output")
        out.set_shared_memory("out", out_bytes, offset=256)
        self.client.infer("lin", [inp], outputs=[out])
        self.check(shm.get_contents_as_numpy(h_out, np.float32, [rows, OUT], offset=256), x,
                   "output in shm")
        self.client.unregister_system_shared_memory("in")
        self.assertEqual(list(self.client.get_system_shared_memory_status().regions.keys()),
                         ["out"])
        self.client.unregister_system_shared_memory()
        self.assertEqual(len(self.client.get_system_shared_memory_status().regions), 0)
        self.d.stop()

    def test_cuda_regions_none(self):
        self.client.unregister_cuda_shared_memory()
        self.client.unregister_cuda_shared_memory("gpu_region")
        with self.assertRaises(InferenceServerException) as cm:
            self.client.register_cuda_shared_memory("g", b"\0" * 64, 0, 64)
        self.assertEqual(cm.exception.status(), "StatusCode.UNIMPLEMENTED", str(cm.exception))

    def test_object_shrinks_while_queued(self):
        n = 2048
        wpath = self.path("big.safetensors")
        W, b = make_layer(wpath, n, n, bias=True, dtype="F32", seed=23)
        d = self.start_daemon(wpath, "--cpu", 1, "--slots", 1, "--batch-delay-us", 0,
                              "--max-batch", 256, "--model", "big", name="shrink")
        client = tgrpc.InferenceServerClient(url=d.addr)
        self.addCleanup(client.close)
        pids = d.worker_pids()
        rows = 4
        h_out, key_out = self.region("big_out", rows * n * 4)
        h_in, key_in = self.region("big_in", rows * n * 4)
        client.register_system_shared_memory("big_out", key_out, rows * n * 4)
        client.register_system_shared_memory("big_in", key_in, rows * n * 4)
        x_in = self.rng.standard_normal((rows, n)).astype(np.float32)
        shm.set_shared_memory_region(h_in, [x_in])
        results, done = {}, []

        def send(tag, inp, outputs=None):
            def callback(result, error):  # tritonclient passes them by name
                results[tag] = (result, error)
                done.append(tag)

            client.async_infer("big", [inp], callback, outputs=outputs, client_timeout=120)

        # long jobs first, so that the two hostile requests wait in the queue behind them; the
        # worker is stopped meanwhile, so they wait however fast it is
        os.kill(pids[0], signal.SIGSTOP)
        self.addCleanup(lambda: d.running() and os.kill(pids[0], signal.SIGCONT))
        xs = [self.rng.standard_normal((256, n)).astype(np.float32) for _ in range(16)]
        for i, x in enumerate(xs):
            inp = tgrpc.InferInput("input", [256, n], "FP32")
            inp.set_data_from_numpy(x)
            send("long%d" % i, inp)
        inp = tgrpc.InferInput("input", [rows, n], "FP32")
        inp.set_data_from_numpy(self.rng.standard_normal((rows, n)).astype(np.float32))
        out = tgrpc.InferRequestedOutput("output")
        out.set_shared_memory("big_out", rows * n * 4)
        send("out_shrunk", inp, [out])
        inp = tgrpc.InferInput("input", [rows, n], "FP32")
        inp.set_shared_memory("big_in", rows * n * 4)
        send("in_shrunk", inp)
        # all taken: the first long job with the worker, the others queued behind it
        def pending():
            return tpdtest.metric_series(d.scrape(), "nv_inference_pending_request_count").get(
                'model="big",version="1"', 0)

        tpdtest.wait_for(lambda: pending() == len(xs) + 1, 30, "every request queued", d)
        for key in (key_out, key_in):
            os.truncate("/dev/shm" + key, 0)
        os.kill(pids[0], signal.SIGCONT)
        deadline = time.monotonic() + 120
        while len(done) < len(xs) + 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual(len(done), len(xs) + 2, "requests got no answer: %s" % d.log_tail())
        self.assertTrue(d.running(), "tpd died:\n%s" % d.log_tail())
        for i, x in enumerate(xs):
            r, e = results["long%d" % i]
            self.assertIsNone(e, str(e))
            ref, mag = reference(x, W, b)
            self.assertLessEqual(rel_err(r.as_numpy("output"), ref, mag), TOL)
        for tag in ("out_shrunk", "in_shrunk"):
            r, e = results[tag]
            self.assertIsNotNone(e, "%s was answered from a shrunk object" % tag)
            self.assertEqual(e.status(), "StatusCode.INVALID_ARGUMENT", "%s: %s" % (tag, e))
            self.assertIn("shrank", e.message(), tag)
        # the daemon serves on, with the same workers
        x = self.rng.standard_normal((3, n)).astype(np.float32)
        inp = tgrpc.InferInput("input", [3, n], "FP32")
        inp.set_data_from_numpy(x)
        ref, mag = reference(x, W, b)
        self.assertLessEqual(rel_err(client.infer("big", [inp]).as_numpy("output"), ref, mag), TOL)
        self.assertEqual(d.worker_pids(), pids)
        client.unregister_system_shared_memory()
        d.stop()
        self.assertEqual(d.proc.returncode, 0, d.log_tail())

    def test_bad_bounds(self):
        pids = self.d.worker_pids()
        rows = 2
        in_bytes = rows * IN * 4
        h, key = self.region("r", 1000)
        reg = self.client.register_system_shared_memory
        # registering: beyond the object, overflowing, unknown object, twice
        code, msg = self.status_code(reg, "big", key, 1001)
        self.assertEqual(code, "StatusCode.INVALID_ARGUMENT", msg)
        self.assertIn("1000 bytes", msg)
        code, msg = self.status_code(reg, "off", key, 8, offset=993)
        self.assertEqual(code, "StatusCode.INVALID_ARGUMENT", msg)
        code, msg = self.status_code(reg, "wrap", key, 2**64 - 8, offset=16)
        self.assertEqual(code, "StatusCode.INVALID_ARGUMENT", msg)
        code, msg = self.status_code(reg, "none", "/%s-missing" % self.tag, 8)
        self.assertEqual(code, "StatusCode.NOT_FOUND", msg)
        code, msg = self.status_code(reg, "zero", key, 0)
        self.assertEqual(code, "StatusCode.INVALID_ARGUMENT", msg)
        reg("r", key, 1000)
        code, msg = self.status_code(reg, "r", key, 1000)
        self.assertEqual(code, "StatusCode.INVALID_ARGUMENT", msg)
        self.assertIn("already registered", msg)
        x = self.rng.standard_normal((rows, IN)).astype(np.float32)
        shm.set_shared_memory_region(h, [x])

        def infer_in(byte_size, offset=0, region="r"):
            inp = tgrpc.InferInput("input", [rows, IN], "FP32")
            inp.set_shared_memory(region, byte_size, offset=offset)
            return self.status_code(self.client.infer, "lin", [inp])

        # the range outside the region, at the edge, far beyond, and wrapping around 2^63
        for off in (1000 - in_bytes + 4, 1000, 2**40, 2**63 - 4):
            code, msg = infer_in(in_bytes, off)
            self.assertEqual(code, "StatusCode.INVALID_ARGUMENT", "offset %d: %s" % (off, msg))
        # byte_size that is not rows*in*4
        code, msg = infer_in(in_bytes - 4)
        self.assertEqual(code, "StatusCode.INVALID_ARGUMENT", msg)
        self.assertIn(str(in_bytes), msg)
        code, msg = infer_in(in_bytes, region="nope")
        self.assertEqual(code, "StatusCode.NOT_FOUND", msg)
        # output too big for the region
        inp = tgrpc.InferInput("input", [rows, IN], "FP32")
        inp.set_data_from_numpy(x)
        out = tgrpc.InferRequestedOutput("output")
        out.set_shared_memory("r", rows * OUT * 4, offset=1000 - rows * OUT * 4 + 1)
        code, msg = self.status_code(self.client.infer, "lin", [inp], outputs=[out])
        self.assertEqual(code, "StatusCode.INVALID_ARGUMENT", msg)
        # a good request at the very end of the region still works
        off = 1000 - in_bytes
        shm.set_shared_memory_region(h, [x], offset=off)
        inp = tgrpc.InferInput("input", [rows, IN], "FP32")
        inp.set_shared_memory("r", in_bytes, offset=off)
        self.check(self.client.infer("lin", [inp]).as_numpy("output"), x, "edge of region")
        self.client.unregister_system_shared_memory("r")
        self.assertEqual(self.d.worker_pids(), pids)
        self.d.stop()

    def test_tpclient_forward_shm(self):
        rows = 2 * MAX_BATCH + 3
        x = self.rng.standard_normal((rows, IN)).astype(np.float32)
        before = set(os.listdir("/dev/shm"))
        y_shm = self.forward(self.d, x, "--shm", name="viashm")
        y_msg = self.forward(self.d, x, name="viamsg")
        self.check(y_shm, x, "tpclient forward --shm")
        self.check(y_msg, x, "tpclient forward")
        left = [n for n in set(os.listdir("/dev/shm")) - before if n.startswith("tpclient-")]
        self.assertEqual(left, [], "tpclient left shared memory behind")
        self.assertEqual(len(self.client.get_system_shared_memory_status().regions), 0,
                         "tpclient left its region registered")
        self.d.stop()


if __name__ == "__main__":
    unittest.main(verbosity=2)
