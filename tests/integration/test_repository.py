"""Many models in one tpd (--model-repository): one worker per rank serves them all.

The repository holds, from the checkpoints of tests/data/hf, a column-parallel layer with a bias
(Qwen2's q_proj, FP16), an MLP block (Llama's layer 0, BF16, one all-reduce), a tied lm_head
(GPT-2's, 1003 outputs: 502 + 501 at N = 2) and a Conv1D layer (GPT-2's c_attn), each checked
against PyTorch's float64 output (y64) of cases.json, and two models that cannot load: a
checkpoint that is not there and a file with a misspelt key. At N = 2:

* every good model serves at once, each answer right, under concurrent load to all of them from
  gRPC and REST clients; the index lists every model with its state and, for the bad ones, why;
  the models share the two workers; each has its own statistics and metrics (model label);
* in explicit mode, while one model is under load, others are loaded and unloaded in a loop: the
  loaded model's answers stay right and never fail; an unloaded model is refused (UNAVAILABLE),
  a load of a bad model fails with its reason and disturbs nothing, an unknown one is NOT_FOUND;
* a worker killed under load to every model: requests in flight may fail (UNAVAILABLE), nothing
  is ever wrong, and every model comes back;
* 20 load/unload cycles: tpd's and the workers' resident memory and descriptors come back to
  their level.
"""

import json
import os
import re
import signal
import sys
import threading
import time
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpdtest  # noqa: E402
from tpdtest import TpdTestCase, make_layer, rel64  # noqa: E402

import tritonclient.grpc as tgrpc  # noqa: E402
import tritonclient.http as thttp  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

HF_DIR = os.path.join(os.path.dirname(tpdtest.SEED_DIR), "hf")
TOL = 1e-5
with open(os.path.join(HF_DIR, "cases.json")) as f:
    CASES = {c["name"]: c for c in json.load(f)}

# model name -> (its NAME.json, the case of cases.json it must answer)
MODELS = {
    "qwen_q": ({"weights": "qwen2-bias-fp16", "weight": "model.layers.0.self_attn.q_proj",
                "slots": 2}, "qwen2.layers.0.self_attn.q_proj"),
    "llama_mlp": ({"weights": "llama-sharded-bf16", "block": "model.layers.0.mlp"},
                  "llama.layers.0.mlp"),
    "gpt2_lm_head": ({"weights": "gpt2-tied-fp32", "weight": "lm_head", "max_batch": 64},
                     "gpt2.lm_head"),
    "gpt2_c_attn": ({"weights": "gpt2-tied-fp32", "weight": "transformer.h.0.attn.c_attn"},
                    "gpt2.h.0.attn.c_attn"),
}
BAD = {"missing": {"weights": "no-such-checkpoint"},
       "misspelt": {"weigths": "gpt2-tied-fp32"}}


def case_xy(name):
    c = CASES[MODELS[name][1]]
    return (np.load(os.path.join(HF_DIR, c["x"])).astype(np.float32),
            np.load(os.path.join(HF_DIR, c["y64"])))


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


class Load:
    """Threads that send one model's case again and again (gRPC, or REST with rest=True) and
    check every answer against y64; errors are kept apart from wrong answers."""

    def __init__(self, test, d, name, threads=2, rest=False):
        self.test, self.d, self.name, self.rest = test, d, name, rest
        self.x, self.y64 = case_xy(name)
        self.stop_ev = threading.Event()
        self.ok, self.errors, self.wrong = 0, [], []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def run(self):
        if self.rest:
            client = thttp.InferenceServerClient(url=self.d.http_addr())
            inp = thttp.InferInput("input", list(self.x.shape), "FP32")
            inp.set_data_from_numpy(self.x, binary_data=True)
        else:
            client = tgrpc.InferenceServerClient(url=self.d.addr)
            inp = tgrpc.InferInput("input", list(self.x.shape), "FP32")
            inp.set_data_from_numpy(self.x)
        while not self.stop_ev.is_set():
            try:
                y = client.infer(self.name, [inp]).as_numpy("output")
            except InferenceServerException as e:
                with self.lock:
                    self.errors.append(str(e))
                time.sleep(0.01)
                continue
            err = rel64(y, self.y64)
            with self.lock:
                if err > TOL:
                    self.wrong.append(err)
                else:
                    self.ok += 1
        client.close()

    def stop(self):
        self.stop_ev.set()
        for t in self.threads:
            t.join(timeout=60)
        return self


class RepoCase(TpdTestCase):

    def repository(self, names, bad=()):
        repo = self.path("models")
        os.makedirs(repo, exist_ok=True)
        for n in names:
            conf = dict(MODELS[n][0])
            conf["weights"] = os.path.join(HF_DIR, conf["weights"])
            with open(os.path.join(repo, n + ".json"), "w") as f:
                json.dump(conf, f)
        for n in bad:
            with open(os.path.join(repo, n + ".json"), "w") as f:
                json.dump(BAD[n], f)
        return repo

    def serve(self, repo, *args, name="repo", cpu=2):
        return self.start_daemon(None, "--model-repository", repo, "--cpu", cpu, "--config",
                                 "none", *args, name=name)

    def index(self, client):
        return {m.name: (m.state, m.reason) for m in client.get_model_repository_index().models}

    def check_model(self, client, name, what):
        x, y64 = case_xy(name)
        inp = tgrpc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        y = client.infer(name, [inp], client_timeout=30).as_numpy("output")
        err = rel64(y, y64)
        self.assertLessEqual(err, TOL, "%s: %s: rel %.3g vs y64" % (what, name, err))


class TestServing(RepoCase):

    def test_every_model_at_once_under_load(self):
        repo = self.repository(MODELS, bad=BAD)
        d = self.serve(repo)
        client = tgrpc.InferenceServerClient(url=d.addr)
        self.addCleanup(client.close)
        idx = self.index(client)
        for n in MODELS:
            self.assertEqual(idx[n], ("READY", ""), idx)
        self.assertEqual(idx["missing"][0], "UNAVAILABLE")
        self.assertIn("no-such-checkpoint", idx["missing"][1])
        self.assertEqual(idx["misspelt"][0], "UNAVAILABLE")
        self.assertIn("unknown key 'weigths'", idx["misspelt"][1])
        # the models that failed are reported, not in the way: the server is ready
        self.assertTrue(client.is_server_ready())
        self.assertFalse(client.is_model_ready("missing"))
        # one worker per rank for all of them
        self.assertEqual(sorted(d.worker_pids()), [0, 1])
        self.assertEqual(len(d.all_worker_pids()), 2, d.log_tail())
        loads = [Load(self, d, n, threads=1) for n in MODELS] + \
            [Load(self, d, n, threads=1, rest=True) for n in ("llama_mlp", "gpt2_lm_head")]
        tpdtest.wait_for(lambda: all(ld.ok > 3 or ld.wrong or ld.errors for ld in loads), 60,
                         "more than 3 answers to every load", d)
        for ld in loads:
            ld.stop()
            self.assertEqual(ld.wrong, [], "%s: wrong answers under load" % ld.name)
            self.assertEqual(ld.errors, [], "%s: failed under load" % ld.name)
            self.assertGreater(ld.ok, 3, "%s: too few answers under load" % ld.name)
        # each model its own statistics and series
        served = {n: sum(ld.ok for ld in loads if ld.name == n) for n in MODELS}
        stats = {s.name: s for s in client.get_inference_statistics().model_stats}
        self.assertEqual(sorted(stats), sorted(MODELS))
        for n in MODELS:
            rows = case_xy(n)[0].reshape(-1, case_xy(n)[0].shape[-1]).shape[0]
            self.assertGreaterEqual(stats[n].inference_count, served[n] * rows, n)
        series = tpdtest.metric_series(d.scrape(), "nv_inference_count")
        for n in MODELS:
            self.assertIn('model="%s",version="1"' % n, series)
        # model control is off without --model-control-mode explicit
        with self.assertRaises(InferenceServerException) as cm:
            client.unload_model("qwen_q")
        self.assertIn("model-control-mode", cm.exception.message())
        self.check_model(client, "qwen_q", "after a refused unload")
        d.stop()


class TestControl(RepoCase):

    def test_load_and_unload_while_serving(self):
        repo = self.repository(MODELS, bad=("missing",))
        d = self.serve(repo, "--model-control-mode", "explicit", "--load-model", "llama_mlp")
        client = tgrpc.InferenceServerClient(url=d.addr)
        self.addCleanup(client.close)
        idx = self.index(client)
        self.assertEqual(idx["llama_mlp"][0], "READY")
        self.assertEqual(idx["qwen_q"], ("UNAVAILABLE", "not loaded"))
        busy = Load(self, d, "llama_mlp", threads=2)
        http = thttp.InferenceServerClient(url=d.http_addr())
        self.addCleanup(http.close)
        try:
            for cycle in range(4):
                for n in ("qwen_q", "gpt2_lm_head", "gpt2_c_attn"):
                    if cycle % 2:
                        http.load_model(n)
                    else:
                        client.load_model(n)
                    self.assertTrue(client.is_model_ready(n), n)
                    self.check_model(client, n, "cycle %d" % cycle)
                for n in ("qwen_q", "gpt2_lm_head", "gpt2_c_attn"):
                    (http if cycle % 2 else client).unload_model(n)
                    self.assertFalse(client.is_model_ready(n), n)
                    with self.assertRaises(InferenceServerException) as cm:
                        self.check_model(client, n, "unloaded")
                    self.assertIn("UNAVAILABLE", str(cm.exception.status()))
                    self.assertIn("unloaded", cm.exception.message())
            # a load that fails says why and disturbs nothing; an unknown one is NOT_FOUND
            with self.assertRaises(InferenceServerException) as cm:
                client.load_model("missing")
            self.assertIn("no-such-checkpoint", cm.exception.message())
            with self.assertRaises(InferenceServerException) as cm:
                client.load_model("nosuch")
            self.assertIn("NOT_FOUND", str(cm.exception.status()))
            # a model added to the folder since the start is loaded by name
            conf = dict(MODELS["qwen_q"][0], weights=os.path.join(HF_DIR, "qwen2-bias-fp16"))
            with open(os.path.join(repo, "late.json"), "w") as f:
                json.dump(conf, f)
            client.load_model("late")
            x, y64 = case_xy("qwen_q")
            self.assertLessEqual(rel64(tpdtest.triton_infer(d.addr, x, model="late"), y64), TOL)
            client.unload_model("late")
        finally:
            busy.stop()
        self.assertEqual(busy.wrong, [], "wrong answers while others loaded and unloaded")
        self.assertEqual(busy.errors, [], "failures while others loaded and unloaded")
        self.assertGreater(busy.ok, 10)
        print("llama_mlp answered %d requests, all right, while 3 models were loaded and "
              "unloaded 4 times" % busy.ok)
        d.stop()

    def test_unload_waits_for_requests_in_flight(self):
        repo = self.repository(("qwen_q", "llama_mlp"))
        d = self.serve(repo, "--model-control-mode", "explicit", "--load-model", "*",
                       "--batch-delay-us", 0)
        client = tgrpc.InferenceServerClient(url=d.addr)
        self.addCleanup(client.close)
        busy = Load(self, d, "qwen_q", threads=3)
        tpdtest.wait_for(lambda: busy.ok >= 3 or busy.wrong or busy.errors, 30,
                         "the load to be answered", d)
        client.unload_model("qwen_q")
        busy.stop()
        # requests taken before the unload were answered, and right; later ones were refused
        self.assertEqual(busy.wrong, [])
        self.assertGreater(busy.ok, 0)
        for e in busy.errors:
            self.assertIn("not ready", e)
        self.check_model(client, "llama_mlp", "after the unload")
        d.stop()


def threads_of(pid):
    """{tid: (name, nice)} of the threads of pid, from /proc."""
    out = {}
    for tid in os.listdir("/proc/%d/task" % pid):
        with open("/proc/%d/task/%s/stat" % (pid, tid)) as f:
            stat = f.read()
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        out[int(tid)] = (name, int(stat[stat.rindex(")") + 2:].split()[16]))  # field 19: nice
    return out


class TestPriorities(RepoCase):

    def test_loads_run_low_and_jobs_do_not(self):
        # A cpu worker loads on a thread of the lowest priority (nice 19), so that a load takes
        # the cores the jobs leave. The GEMM threads of a model it loads must not inherit that
        # priority: they start with the model's first job, from the thread that serves jobs.
        repo = self.path("prio")
        os.makedirs(repo)
        for name, seed in (("a", 1), ("b", 2)):
            make_layer(os.path.join(repo, name + ".safetensors"), 512, 1024, bias=True,
                       dtype="F32", seed=seed)
            with open(os.path.join(repo, name + ".json"), "w") as f:
                json.dump({"weights": name + ".safetensors", "max_batch": 64}, f)
        d = self.serve(repo, "--model-control-mode", "explicit", "--load-model", "a", cpu=1,
                       name="prio")
        threads = int(re.search(r"1 cpu ranks, (\d+) threads each", d.log()).group(1))
        worker = d.worker_pids()[0]
        client = tgrpc.InferenceServerClient(url=d.addr)
        self.addCleanup(client.close)
        x = np.ones((64, 1024), np.float32)  # 64 x 1024 x 512: large enough for every thread
        for model, loads in (("a", 1), ("b", 2)):
            if model == "b":
                client.load_model("b")
            inp = tgrpc.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            self.assertEqual(client.infer(model, [inp]).as_numpy("output").shape, (64, 512))
            t = threads_of(worker)
            loader = [n for n, nice in t.values() if n == "tpd-loader"]
            self.assertEqual(loader, ["tpd-loader"], "no loader thread: %r" % t)
            self.assertEqual([nice for n, nice in t.values() if n == "tpd-loader"], [19], t)
            gemm = [nice for n, nice in t.values() if n == "tpd-gemm"]
            self.assertEqual(len(gemm), loads * (threads - 1), "GEMM threads: %r" % t)
            self.assertEqual(set(gemm) - {0}, set(), "a GEMM thread runs at low priority: %r" % t)
            others = [(n, nice) for n, nice in t.values() if n != "tpd-loader" and nice != 0]
            self.assertEqual(others, [], "threads of the worker at low priority: %r" % t)
        print("worker threads: %r" % sorted(threads_of(worker).values()))
        d.stop()


class TestRecovery(RepoCase):

    def test_worker_killed_under_load_to_every_model(self):
        repo = self.repository(MODELS)
        d = self.serve(repo, "--restart-backoff-ms", 100)
        client = tgrpc.InferenceServerClient(url=d.addr)
        self.addCleanup(client.close)
        loads = [Load(self, d, n, threads=1) for n in MODELS]
        tpdtest.wait_for(lambda: all(ld.ok > 0 for ld in loads), 30, "answers to every load", d)
        os.kill(d.worker_pids()[1], signal.SIGKILL)
        t0 = time.monotonic()
        # the group goes down and comes back: its line, then every model ready
        tpdtest.wait_for(lambda: d.count(r"worker group of 2 ranks is up again") == 1, 30,
                         "the worker group to come back", d)
        tpdtest.wait_for(lambda: all(client.is_model_ready(n) for n in MODELS), 30,
                         "every model ready again", d)
        back = time.monotonic() - t0
        # and every load is answered again
        oks = [ld.ok for ld in loads]
        tpdtest.wait_for(lambda: all(ld.ok > ok for ld, ok in zip(loads, oks)), 30,
                         "answers to every load after the restart", d)
        for ld in loads:
            ld.stop()
            self.assertEqual(ld.wrong, [], "%s: a wrong answer around the kill" % ld.name)
            for e in ld.errors:
                self.assertIn("UNAVAILABLE", e.upper(), e)
        for n in MODELS:
            self.check_model(client, n, "after the restart")
        self.assertEqual(d.count(r"worker group of 2 ranks is up again"), 1, d.log_tail())
        print("worker killed under load to %d models: all ready again after %.2f s" % (
            len(MODELS), back))
        d.stop()


class TestCycles(RepoCase):

    def test_memory_and_descriptors_come_back(self):
        repo = self.repository(("llama_mlp", "gpt2_lm_head"))
        d = self.serve(repo, "--model-control-mode", "explicit", "--load-model", "llama_mlp")
        client = tgrpc.InferenceServerClient(url=d.addr)
        self.addCleanup(client.close)
        pids = [d.proc.pid] + list(d.worker_pids().values())

        def cycle():
            client.load_model("gpt2_lm_head")
            self.check_model(client, "gpt2_lm_head", "cycle")
            client.unload_model("gpt2_lm_head")

        for _ in range(3):  # warm: gRPC's buffers, first-touch pages
            cycle()
        rss0 = [rss_kib(p) for p in pids]
        fd0 = [fds(p) for p in pids]
        for _ in range(20):
            cycle()
        rss1 = [rss_kib(p) for p in pids]
        fd1 = [fds(p) for p in pids]
        for _ in range(20):
            cycle()
        rss2 = [rss_kib(p) for p in pids]
        self.assertEqual(fd1, fd0, "descriptors of tpd and its workers after 20 cycles")
        self.assertEqual([fds(p) for p in pids], fd0, "descriptors after 40 cycles")
        # a rank's shard is 0.23 MiB and the arena 1 MiB: a leak of either would add 4.6 MiB or
        # more per 20 cycles. The first 20 may grow the heaps (malloc keeps what it freed, to
        # reuse it); the next 20 must not.
        for p, a, b, c in zip(pids, rss0, rss1, rss2):
            if tpdtest.sanitized(p):
                print("pid %d runs under AddressSanitizer, whose quarantine keeps what is freed: "
                      "its resident memory is not checked (LeakSanitizer checks for leaks at "
                      "its exit)" % p)
                continue
            self.assertLess(b - a, 4096, "pid %d: resident %d -> %d KiB after 20 cycles" % (
                p, a, b))
            self.assertLess(c - b, 1024, "pid %d: resident %d -> %d KiB over cycles 20 to 40" % (
                p, b, c))
        self.check_model(client, "llama_mlp", "after the cycles")
        print("40 load/unload cycles: resident KiB %s -> %s (20) -> %s (40), descriptors %s" % (
            rss0, rss1, rss2, fd0))
        d.stop()


if __name__ == "__main__":
    unittest.main(verbosity=2)
