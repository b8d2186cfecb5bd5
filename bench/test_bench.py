"""Smoke tests of the benchmark tools: `tpclient bench` as a load generator against a real tpd
and against bench/echo_server, gemm_baseline, the harness bench/run.py on tiny shapes, the
load benchmark bench/load.py on a tiny layer, the block benchmark bench/block.py on a tiny
block, and bench/barrier with few rounds.

They check that the numbers are consistent -- counts that add up (the client's per-client calls,
its total, and the requests tpd logged), rates that agree with counts and time, ordered
percentiles -- and never how fast anything is. Environment (ctest sets it): TPD, TPCLIENT,
TP_SEED_DIR as for the integration tests, plus ECHO_SERVER, GEMM_BASELINE, BARRIER and
TP_BUILD_DIR."""

import glob
import os
import re
import subprocess
import sys
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "integration"))
from tpdtest import (ACCEPTED_RE, Result, TpdTestCase, make_layer, one_line_error,  # noqa: E402
                     run)

ECHO_SERVER = os.environ.get("ECHO_SERVER", "")
GEMM_BASELINE = os.environ.get("GEMM_BASELINE", "")
BARRIER = os.environ.get("BARRIER", "")
BUILD_DIR = os.environ.get("TP_BUILD_DIR", "")
IN, OUT = 64, 96


def result_line(testcase, res, prefix="bench-result:"):
    """The key=value pairs of the one result line; fails the test unless there is exactly one."""
    testcase.assertEqual(res.rc, 0, repr(res))
    lines = [ln for ln in res.out.splitlines() if ln.startswith(prefix)]
    testcase.assertEqual(len(lines), 1, repr(res))
    kv = {}
    for item in lines[0][len(prefix):].split():
        k, _, v = item.partition("=")
        kv[k] = v
    return kv


def result_lines(testcase, res, prefix):
    """The key=value pairs of every result line, in order; fails the test unless it exited 0."""
    testcase.assertEqual(res.rc, 0, repr(res))
    out = []
    for ln in res.out.splitlines():
        if ln.startswith(prefix):
            out.append(dict(item.partition("=")[::2] for item in ln[len(prefix):].split()))
    return out


class TestBench(TpdTestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        for var, path in (("ECHO_SERVER", ECHO_SERVER), ("GEMM_BASELINE", GEMM_BASELINE),
                          ("BARRIER", BARRIER)):
            if not path or not os.access(path, os.X_OK):
                raise AssertionError("%s=%r is not an executable (run through ctest)" %
                                     (var, path))

    def layer(self):
        path = self.path("layer.safetensors")
        make_layer(path, OUT, IN, seed=3)
        return path

    def assert_consistent(self, kv, rows, conc, calls=None, flop_shape=(IN, OUT)):
        """The checks every bench-result line must pass; returns the numbers."""
        n = int(kv["calls"])
        per = [int(c) for c in kv["per_client"].split(",")]
        sec, rps = float(kv["seconds"]), float(kv["rps"])
        p50, p90, p99 = float(kv["p50_ms"]), float(kv["p90_ms"]), float(kv["p99_ms"])
        self.assertEqual(int(kv["rows"]), rows)
        self.assertEqual(int(kv["concurrency"]), conc)
        self.assertEqual(len(per), conc, kv)
        self.assertEqual(sum(per), n, kv)
        if calls is not None:
            self.assertEqual(n, calls, kv)
        self.assertGreater(n, 0, kv)
        self.assertGreater(sec, 0, kv)
        self.assertAlmostEqual(rps, n / sec, delta=rps * 1e-3 + 1e-3)
        self.assertAlmostEqual(float(kv["rows_per_s"]), rps * rows, delta=rps * rows * 1e-3 + 0.01)
        flop = 2.0 * rows * flop_shape[0] * flop_shape[1]
        self.assertAlmostEqual(float(kv["gflops"]), rps * flop * 1e-9,
                               delta=rps * flop * 1e-12 + 1e-6)
        self.assertGreater(p50, 0, kv)
        self.assertLessEqual(p50, p90, kv)
        self.assertLessEqual(p90, p99, kv)
        self.assertLessEqual(p99, float(kv["max_ms"]), kv)
        self.assertLessEqual(float(kv["mean_ms"]), float(kv["max_ms"]), kv)
        # each client has one call in flight: the latencies cannot add up to more than the time
        self.assertLessEqual(float(kv["mean_ms"]) * n / conc / 1e3, sec * 1.01 + 0.01, kv)
        return n

    def test_concurrency_counts_match_the_server(self):
        d = self.start_daemon(self.layer(), "--cpu", "2", "--log-level", "debug")
        res = d.client("bench", "--concurrency", "4", "--iters", "200", "--rows", "3",
                       "--warmup", "2", timeout=120)
        kv = result_line(self, res)
        self.assertEqual(kv["channels"], "per-client")
        self.assertEqual(kv["shm"], "0")
        self.assertEqual((int(kv["in"]), int(kv["out"])), (IN, OUT))
        self.assert_consistent(kv, 3, 4, calls=200)
        self.assertIn("latency ms: p50 ", res.out)
        self.assertIn("requests/s", res.out)
        d.stop()
        # every measured call, plus per client one checked call and 2 warm-up calls
        self.assertEqual(d.count(ACCEPTED_RE), 200 + 4 * 3, d.log_tail())

    def test_duration_with_one_shared_channel(self):
        d = self.start_daemon(self.layer(), "--cpu", "1")
        t0 = time.monotonic()
        res = d.client("bench", "--concurrency", "3", "--duration", "1", "--rows", "5",
                       "--shared-channel", timeout=120)
        wall = time.monotonic() - t0
        kv = result_line(self, res)
        self.assertEqual(kv["channels"], "shared")
        self.assert_consistent(kv, 5, 3)
        self.assertGreaterEqual(float(kv["seconds"]), 1.0, kv)
        self.assertLessEqual(float(kv["seconds"]), wall, kv)

    def test_echo_server_answers_the_same_client(self):
        sock = "unix:" + self.path("echo.sock")
        p = subprocess.Popen([ECHO_SERVER, "--listen", sock, "--in", str(IN), "--out", str(OUT),
                              "--rows", "7", "--model", "layer"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        self.addCleanup(p.stdout.close)
        self.addCleanup(p.wait, 20)
        self.addCleanup(p.terminate)
        self.assertEqual(p.stdout.readline().strip(), "ready")
        res = run([os.environ["TPCLIENT"], "--server", sock, "bench", "--rows", "7",
                   "--concurrency", "2", "--iters", "50"])
        kv = result_line(self, res)
        self.assertEqual(kv["model"], "layer")
        self.assert_consistent(kv, 7, 2, calls=50)
        # it serves one shape: more rows than it answers for are refused by the client
        res = run([os.environ["TPCLIENT"], "--server", sock, "bench", "--rows", "8"])
        self.assertEqual(res.rc, 1, repr(res))
        self.assertIn("max_batch 7", res.err)
        one_line_error(self, res)
        p.terminate()
        self.assertEqual(p.wait(20), 0)

    def test_bad_arguments(self):
        d = self.start_daemon(self.layer())
        for args, rc, text in ((["--concurrency", "0"], 64, "--concurrency"),
                               (["--iters", "5", "--duration", "1"], 64, "not both"),
                               (["--duration", "-1"], 64, "--duration"),
                               (["--rows", "x"], 64, "--rows"),
                               (["--frobnicate"], 64, "--frobnicate"),
                               (["--rows", "100000"], 1, "max_batch 256")):
            res = d.client("bench", *args)
            self.assertEqual(res.rc, rc, repr(res))
            self.assertIn(text, res.err, repr(res))
            one_line_error(self, res)

    def test_shm_works_or_fails_cleanly(self):
        d = self.start_daemon(self.layer(), "--cpu", "2")
        res = d.client("bench", "--shm", "--iters", "20", "--rows", "4", "--concurrency", "2")
        if res.rc == 0:
            kv = result_line(self, res)
            self.assertEqual(kv["shm"], "1")
            self.assert_consistent(kv, 4, 2, calls=20)
        else:
            # a tpd without the shared-memory extension: one clear line, nothing left behind
            self.assertEqual(res.rc, 1, repr(res))
            self.assertIn("UNIMPLEMENTED", res.err)
            one_line_error(self, res)
        self.assertEqual(glob.glob("/dev/shm/tpbench.*"), [])

    def test_gemm_baseline(self):
        res = run([GEMM_BASELINE, "--rows", "3", "--in", str(IN), "--out", str(OUT), "--iters",
                   "20", "--threads", "2"])
        kv = result_line(self, res, "gemm-result:")
        self.assertEqual(int(kv["calls"]), 20)
        self.assertEqual(int(kv["threads"]), 2)
        self.assertLessEqual(float(kv["p50_ms"]), float(kv["p90_ms"]))
        self.assertLessEqual(float(kv["p90_ms"]), float(kv["p99_ms"]))
        self.assertAlmostEqual(float(kv["rps"]), 20 / float(kv["seconds"]),
                               delta=float(kv["rps"]) * 1e-3)
        self.assertRegex(res.out, r"openblas: .*core \w+")
        self.assertEqual(kv["gemm"], "openblas")
        # the invariant GEMM: the same numbers, and the kernel it ran
        res = run([GEMM_BASELINE, "--rows", "3", "--in", str(IN), "--out", str(OUT), "--iters",
                   "20", "--threads", "2", "--gemm", "invariant"])
        kv = result_line(self, res, "gemm-result:")
        self.assertEqual((kv["gemm"], int(kv["calls"])), ("invariant", 20))
        self.assertRegex(res.out, r"invariant gemm: (avx2|generic) kernel")
        res = run([GEMM_BASELINE, "--rows", "5", "--in", str(IN), "--out", str(OUT), "--iters",
                   "10", "--ranks", "3", "--gemm", "invariant"])
        self.assertEqual(int(result_line(self, res, "gemm-result:")["ranks"]), 3)
        # tpd's layout: 3 processes of a 32-column block each, checked against one GEMM inside
        res = run([GEMM_BASELINE, "--rows", "5", "--in", str(IN), "--out", str(OUT), "--iters",
                   "10", "--ranks", "3"])
        kv = result_line(self, res, "gemm-result:")
        self.assertEqual((int(kv["ranks"]), int(kv["calls"])), (3, 10))
        for bad in (["--rows", "0"], ["--ranks", "5", "--out", "96"], ["--iters", "1", "--duration",
                                                                       "1"], ["--gemm", "mkl"]):
            res = run([GEMM_BASELINE] + bad)
            self.assertEqual(res.rc, 64, repr(res))

    def test_harness_smoke(self):
        res = run([sys.executable, os.path.join(HERE, "run.py"), "--smoke", "--build", BUILD_DIR],
                  timeout=240)
        self.assertEqual(res.rc, 0, repr(res))
        out = res.out
        self.assertRegex(out, r"OPENBLAS_CORETYPE=")
        table = [ln for ln in out.splitlines() if ln.startswith("| ") and " cpu" in ln]
        measured = [ln for ln in table
                    if re.search(r"\| (sgemm|sgemm-ranks|echo|tpd|batch-off) \| [0-9]", ln)]
        # 3 shapes x (sgemm, echo, tpd; and sgemm-ranks on --cpu 2) and the batching case's 'off'
        self.assertEqual(len(measured), 3 * 3 + 3 * 4 + 1, out)
        ratios = [ln for ln in table if re.match(r"\| \d+x\d+->\d+ cpu\d \| [0-9.]+ \|", ln)]
        # the ratios table and the batch-invariance table, a line per shape and --cpu each
        self.assertEqual(len(ratios), 2 * 6, out)
        self.assertIn("## batch invariance", out)
        inv = [ln for ln in table if re.search(r"\| (igemm|tpd-openblas) \| [0-9]", ln)]
        self.assertEqual(len(inv), 2 * 6, out)
        self.assertIn("## targets", out)

    def test_load_smoke(self):
        rows, cols = 96, 64
        cache = self.path("cache")
        layer = os.path.join(cache, "lm_head_%dx%d_bf16.safetensors" % (rows, cols))
        tmp_load = [sys.executable, os.path.join(HERE, "load.py"), "--rows", str(rows), "--cols",
                    str(cols), "--build", BUILD_DIR]
        load = tmp_load + ["--dir", cache]
        res = run(load + ["--ranks", "1,2", "--keep"], timeout=120)
        self.assertEqual(res.rc, 0, repr(res))
        self.assertIn("(made in ", res.out)
        self.assertRegex(res.out, r"cat baseline: .* best of 3: [0-9.]+ s")
        results = [ln for ln in res.out.splitlines() if ln.startswith("load-result:")]
        self.assertEqual(len(results), 2, res.out)
        for ranks, ln in zip((1, 2), results):
            kv = result_line(self, Result(res.argv, 0, ln, ""), "load-result:")
            self.assertEqual(int(kv["ranks"]), ranks)
            # every rank read its own shard, and the shards make up the layer
            self.assertEqual([int(b) for b in kv["bytes_per_rank"].split(",")],
                             [rows // ranks * cols * 2] * ranks)
            self.assertLessEqual(float(kv["checked"]), 1e-5)
            self.assertLessEqual(float(kv["read_s"]), float(kv["ready_s"]))
            self.assertGreater(float(kv["cat_s"]), 0)
        table = [ln for ln in res.out.splitlines() if re.match(r"\| 1 \| [12] \| \d+", ln)]
        self.assertEqual(len(table), 2, res.out)
        self.assertEqual(len(re.findall(r"worker read / cat [0-9.]+ \(target <= 1.5\)", res.out)),
                         2, res.out)
        self.assertTrue(os.path.isfile(layer))
        # the kept layer is found by the next run, which leaves it where it was
        res = run(load + ["--ranks", "1", "--warm-memory"], timeout=120)
        self.assertEqual(res.rc, 0, repr(res))
        self.assertIn("(found there)", res.out)
        self.assertRegex(res.out, r"first touched and freed [0-9.]+ GiB before the start")
        self.assertEqual(len([ln for ln in res.out.splitlines()
                              if ln.startswith("load-result:")]), 1, res.out)
        self.assertTrue(os.path.isfile(layer))
        # without --dir, the layer is made in a temporary directory that is gone at the end
        res = run(tmp_load + ["--ranks", "1"], timeout=120)
        self.assertEqual(res.rc, 0, repr(res))
        made = re.search(r"GiB of weights, in (\S+) \(made in ", res.out)
        self.assertTrue(made, res.out)
        self.assertFalse(os.path.exists(os.path.dirname(made.group(1))), res.out)
        for bad in (["--ranks", "0"], ["--ranks", "x"], ["--rows", "1", "--ranks", "2"]):
            res = run(tmp_load + bad)
            self.assertEqual(res.rc, 2, repr(res))

    def assert_rate(self, kv, rows, ms_key, rate_key):
        ms, rate = float(kv[ms_key]), float(kv[rate_key])
        self.assertGreater(ms, 0, kv)
        self.assertAlmostEqual(rate, rows / ms * 1e3, delta=rate * 1e-4 + 1e-3, msg=kv)

    def test_block_smoke(self):
        cache = self.path("block")
        block = [sys.executable, os.path.join(HERE, "block.py"), "--hidden", "64", "--inter",
                 "96", "--build", BUILD_DIR, "--dir", cache]
        res = run(block + ["--batches", "1,4", "--ranks", "1,2", "--iters", "3"], timeout=240)
        self.assertEqual(res.rc, 0, repr(res))
        self.assertIn("(made in ", res.out)
        self.assertIn("OPENBLAS_CORETYPE=", res.out)
        self.assertRegex(res.out, r"numpy's BLAS: .*threads")
        results = result_lines(self, res, "block-result:")
        self.assertEqual(sorted((int(kv["batch"]), int(kv["ranks"])) for kv in results),
                         [(1, 1), (1, 2), (4, 1), (4, 2)], res.out)
        cores = len(os.sched_getaffinity(0))
        for kv in results:
            batch, ranks = int(kv["batch"]), int(kv["ranks"])
            for side in ("numpy", "tpd", "naive"):
                self.assert_rate(kv, batch, side + "_ms", side + "_rows_per_s")
            for side in ("tpd", "naive"):
                self.assertAlmostEqual(float(kv[side + "_over_numpy"]),
                                       float(kv["numpy_ms"]) / float(kv[side + "_ms"]),
                                       delta=float(kv[side + "_over_numpy"]) * 1e-3, msg=kv)
            # every side's answer was checked against the float64 reference
            for key in ("checked", "naive_checked", "numpy_checked"):
                self.assertLessEqual(float(kv[key]), 1e-4, kv)
            # a checked request, the warm-up and the measured ones: each rank ran them all
            self.assertEqual(kv["jobs_per_rank"], ",".join(["7"] * ranks), kv)
            self.assertEqual(int(kv["worker_threads"]), max(1, cores // ranks), kv)
            # the workers' times lie within the client's, the all-reduce within the job (the
            # workers log 3 decimals of ms)
            job, allreduce = float(kv["job_ms"]), float(kv["allreduce_ms"])
            self.assertLessEqual(job, float(kv["tpd_ms"]), kv)
            self.assertLessEqual(float(kv["naive_job_ms"]), float(kv["naive_ms"]), kv)
            self.assertLessEqual(allreduce, job + 0.002, kv)
            for key in ("wait_ms", "reduce_ms"):
                self.assertLessEqual(float(kv[key]), allreduce + 0.002, kv)
            self.assertAlmostEqual(float(kv["allreduce_pct"]), 100 * allreduce / job, delta=0.01,
                                   msg=kv)
            self.assertGreater(float(kv["memcpy_ms"]), 0, kv)
            self.assertGreater(float(kv["memcpy_all_ms"]), 0, kv)
        table = [ln for ln in res.out.splitlines()
                 if re.match(r"\| [14] \| [12] \| [0-9.]+ \|", ln)]
        self.assertEqual(len(table), 4, res.out)
        for name in ("model.safetensors", "config.json", "gate_up.safetensors"):
            self.assertTrue(os.path.isfile(os.path.join(cache, name)), name)
        # the checkpoint is found by the next run with the same shape
        res = run(block + ["--batches", "2", "--ranks", "2", "--iters", "1", "--warmup", "0"],
                  timeout=120)
        self.assertIn("(found there)", res.out, repr(res))
        results = result_lines(self, res, "block-result:")
        self.assertEqual(len(results), 1, res.out)
        self.assertEqual(results[0]["jobs_per_rank"], "2,2", res.out)
        for bad in (["--ranks", "0"], ["--batches", "x"], ["--iters", "0"]):
            res = run(block + bad)
            self.assertEqual(res.rc, 2, repr(res))

    def test_barrier(self):
        res = run([BARRIER, "--rounds", "300", "--warmup", "20", "--reduce-iters", "20"])
        results = result_lines(self, res, "barrier-result:")
        meets = [kv for kv in results if kv["method"] != "reduce"]
        self.assertEqual([(kv["method"], int(kv["spin_ns"])) for kv in meets],
                         [("counter", 0), ("counter", 50000), ("coordinator", -1)], res.out)
        for kv in meets:
            self.assertEqual((int(kv["ranks"]), int(kv["rounds"])), (2, 300), kv)
            p50, p99, mx = float(kv["p50_us"]), float(kv["p99_us"]), float(kv["max_us"])
            self.assertGreater(p50, 0, kv)
            self.assertLessEqual(p50, p99, kv)
            self.assertLessEqual(p99, mx, kv)
            self.assertLessEqual(float(kv["mean_us"]), mx, kv)
        self.assertEqual(int(meets[2]["msg_bytes"]), 424)  # a ctl message
        reduces = [kv for kv in results if kv["method"] == "reduce"]
        self.assertEqual([int(kv["rows"]) for kv in reduces], [1, 16, 64], res.out)
        for kv in reduces:
            rows = int(kv["rows"])
            # rank 0's stripe of 2 ranks: half the columns, read from both partials
            self.assertEqual((int(kv["c0"]), int(kv["nc"])), (0, 2048), kv)
            self.assertEqual(int(kv["bytes_read"]), 2 * rows * 2048 * 4, kv)
            self.assertEqual(int(kv["bytes_written"]), rows * 2048 * 4, kv)
            self.assertAlmostEqual(float(kv["reduce_over_memcpy"]),
                                   float(kv["reduce_p50_us"]) / float(kv["memcpy_p50_us"]),
                                   delta=float(kv["reduce_over_memcpy"]) * 1e-2 + 1e-3, msg=kv)
        # an uneven split: 100 columns are 7 lines, and rank 0 of 3 gets 3 of them
        res = run([BARRIER, "--ranks", "3", "--rounds", "50", "--warmup", "5", "--spin", "0",
                   "--rows", "5", "--cols", "100", "--reduce-iters", "5"])
        results = result_lines(self, res, "barrier-result:")
        self.assertEqual([kv["method"] for kv in results], ["counter", "coordinator", "reduce"],
                         res.out)
        self.assertEqual(int(results[0]["ranks"]), 3)
        self.assertEqual((int(results[2]["nc"]), int(results[2]["bytes_read"])),
                         (48, 3 * 5 * 48 * 4), results[2])
        res = run([BARRIER, "--help"])
        self.assertEqual(res.rc, 0, repr(res))
        self.assertIn("usage: barrier", res.out)
        for bad in (["--ranks", "0"], ["--ranks", "65"], ["--rows", "x"], ["--spin", "-1"],
                    ["--rounds"], ["--frobnicate", "1"]):
            res = run([BARRIER] + bad)
            self.assertEqual(res.rc, 64, repr(res))
            self.assertTrue(res.err.startswith("barrier: "), repr(res))


class ShmServer:
    """A KServe v2 server in Python on tritonclient's own generated service code, which decodes
    `tpclient bench --shm`'s requests independently of our protobuf code: it checks each
    SystemSharedMemoryRegister against the region it maps by key, checks each ModelInfer's
    shared-memory parameters, writes the output region (rows of 1.0, or NaN when told to), and
    records everything for the test to check afterwards."""

    def __init__(self, sock, rows, nan=False):
        import mmap
        from concurrent import futures

        import grpc
        import numpy as np
        from tritonclient.grpc import service_pb2 as pb
        from tritonclient.grpc import service_pb2_grpc as pbg

        self.regions, self.unregistered, self.calls, self.problems = {}, [], 0, []
        srv = self

        class Servicer(pbg.GRPCInferenceServiceServicer):
            def ModelMetadata(self, req, ctx):
                r = pb.ModelMetadataResponse(name=req.name, platform="python")
                r.inputs.add(name="input", datatype="FP32", shape=[-1, IN])
                r.outputs.add(name="output", datatype="FP32", shape=[-1, OUT])
                return r

            def SystemSharedMemoryRegister(self, req, ctx):
                try:
                    fd = os.open("/dev/shm" + req.key, os.O_RDWR)
                    size = os.fstat(fd).st_size
                    m = mmap.mmap(fd, size)
                    os.close(fd)
                except OSError as e:
                    srv.problems.append("register %r: %s" % (req, e))
                    ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
                if req.offset != 0 or req.byte_size != size or req.key != "/" + req.name:
                    srv.problems.append("register %r of a %d-byte region" % (req, size))
                srv.regions[req.name] = m
                return pb.SystemSharedMemoryRegisterResponse()

            def SystemSharedMemoryUnregister(self, req, ctx):
                srv.unregistered.append(req.name)
                srv.regions.pop(req.name).close()
                return pb.SystemSharedMemoryUnregisterResponse()

            def ModelInfer(self, req, ctx):
                srv.calls += 1
                i, o = req.inputs[0].parameters, req.outputs[0].parameters
                b = int(req.inputs[0].shape[0])
                if (len(req.raw_input_contents) or list(req.inputs[0].shape) != [rows, IN] or
                        i["shared_memory_byte_size"].int64_param != rows * IN * 4 or
                        o["shared_memory_byte_size"].int64_param != rows * OUT * 4 or
                        i["shared_memory_region"].string_param not in srv.regions or
                        o["shared_memory_region"].string_param not in srv.regions):
                    srv.problems.append("infer %r" % req)
                    ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad request")
                out = srv.regions[o["shared_memory_region"].string_param]
                y = np.full(b * OUT, np.nan if nan else 1.0, dtype=np.float32)
                out[:y.nbytes] = y.tobytes()
                r = pb.ModelInferResponse(model_name=req.model_name)
                r.outputs.add(name="output", datatype="FP32", shape=[b, OUT])
                r.outputs[0].parameters["shared_memory_region"].string_param = \
                    o["shared_memory_region"].string_param
                return r

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pbg.add_GRPCInferenceServiceServicer_to_server(Servicer(), self.server)
        self.server.add_insecure_port(sock)
        self.server.start()

    def stop(self):
        self.server.stop(None)


class TestBenchShmProtocol(unittest.TestCase):
    """`tpclient bench --shm` against ShmServer: the protocol as Triton's own definitions read it."""

    def setUp(self):
        import tempfile
        self.tmp = tempfile.mkdtemp(prefix="tpbench-")
        self.sock = "unix:" + os.path.join(self.tmp, "shm.sock")

    def tearDown(self):
        import shutil
        shutil.rmtree(self.tmp, ignore_errors=True)

    def bench(self, rows, nan=False, *args):
        srv = ShmServer(self.sock, rows, nan)
        try:
            return srv, run([os.environ["TPCLIENT"], "--server", self.sock, "bench", "--shm",
                             "--rows", str(rows), "--model", "m"] + list(args))
        finally:
            srv.stop()

    def test_regions_requests_and_cleanup(self):
        srv, res = self.bench(5, False, "--concurrency", "3", "--iters", "30", "--warmup", "1")
        self.assertEqual(srv.problems, [])
        kv = result_line(self, res)
        self.assertEqual(kv["shm"], "1")
        self.assertEqual(int(kv["calls"]), 30)
        self.assertEqual(sum(int(c) for c in kv["per_client"].split(",")), 30)
        self.assertEqual(srv.calls, 30 + 3 * 2)  # measured + one checked and one warm-up each
        # two regions per client, each unregistered at the end, and nothing left in /dev/shm
        self.assertEqual(len(srv.unregistered), 6, srv.unregistered)
        self.assertEqual(srv.regions, {})
        self.assertEqual(glob.glob("/dev/shm/tpbench.*"), [])

    def test_output_not_written_is_an_error(self):
        srv, res = self.bench(2, True, "--iters", "5")
        self.assertEqual(res.rc, 1, repr(res))
        self.assertIn("not a finite number", res.err)
        one_line_error(self, res)
        self.assertEqual(len(srv.unregistered), 2, srv.unregistered)
        self.assertEqual(glob.glob("/dev/shm/tpbench.*"), [])


if __name__ == "__main__":
    unittest.main(verbosity=2)
