"""Row-parallel layers and MLP blocks (docs/blocks.md): a row layer's ranks each own a slice of
the inputs and all-reduce their partial sums; a block's ranks run gate and up (or fc) on their
slice of the intermediate, keep it, and all-reduce down's (or proj's) partial sums once.

* Every block and row case of tests/data/hf/cases.json (LlamaMLP, GPT2MLP, Qwen2MLP, down_proj,
  c_proj) at N = 1 to 4 (uneven where N does not divide the split), 2-D and 3-D inputs, batch 1
  and 64, through tritonclient and tpclient --verify (the C reference), against y64 (PyTorch's
  float64 forward on the stored weights) and the NumPy block reference of tpdtest. tpd widens
  the stored BF16/FP16 weights to FP32 exactly and computes in FP32, so every checkpoint gets the
  FP32 tolerance.
* One collective per forward: tpd_collectives_total equals the jobs run.
* Generated blocks with biases, an intermediate split unevenly, every activation, and the
  architectures' other member names; a row layer of one output, whose reduce leaves ranks
  without columns.
* What is refused: the wrong flags, a fused gate_up_proj, a split that leaves a rank nothing.
* kill -9 of a rank while blocks are computing: requests in flight fail UNAVAILABLE, nothing
  wrong is ever answered, and the group comes back.
"""

import json
import os
import re
import signal
import sys
import time
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpdtest  # noqa: E402
from loadgen import Load  # noqa: E402
from tpdtest import (TpdTestCase, block_reference, metadata, read_safetensors,  # noqa: E402
                     reference, rel64, rel_err, triton_infer, wait_gone)

import tritonclient.grpc as tgrpc  # noqa: E402

HF_DIR = os.path.join(os.path.dirname(tpdtest.SEED_DIR), "hf")
TOL = 1e-5
with open(os.path.join(HF_DIR, "cases.json")) as f:
    CASES = json.load(f)
BLOCKS = [c for c in CASES if c["kind"] in ("llama_mlp", "qwen2_mlp", "gpt2_mlp")]
ROWS = [c for c in CASES if c["module"].endswith(("mlp.down_proj", "mlp.c_proj"))]
ACT = {"llama_mlp": "silu", "qwen2_mlp": "silu", "gpt2_mlp": "gelu_tanh"}
LOADED_RE = re.compile(r"tpd-worker rank (\d+): \w+: loaded (\w+) \[(\d+), (\d+)\) of (\d+) ")


def tensor(ckpt, name):
    """A stored tensor of a checkpoint directory (sharded or not) as float32."""
    index = os.path.join(ckpt, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            fname = json.load(f)["weight_map"][name]
    else:
        fname = "model.safetensors"
    return read_safetensors(os.path.join(ckpt, fname))[name]


def layers_of(case):
    """[(W [out, in], b)] of a case's layers, in the order the block applies them."""
    ckpt = os.path.join(HF_DIR, case["checkpoint"])
    out = []
    for i, w in enumerate(case["weights"]):
        W = tensor(ckpt, w["tensor"])
        if w["layout"] == "[in, out]":
            W = W.T
        b = case["biases"][i] if case["biases"] else None
        out.append((np.ascontiguousarray(W), tensor(ckpt, b["tensor"]) if b else None))
    return out


def split(n, ranks):
    return [n // ranks + (r < n % ranks) for r in range(ranks)]


class BlockCase(TpdTestCase):

    def serve(self, weights, *args, ranks=2):
        return self.start_daemon(weights, "--cpu", ranks, "--model", "m",
                                 "--metrics-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", *args)

    def refused(self, weights, *args, rc=(1, 64)):
        res = tpdtest.run([tpdtest.TPD, "--weights", weights, "--config", "none"] + list(args))
        self.assertIn(res.rc, rc, repr(res))
        self.assertNotIn("started worker", res.err)
        return res.err

    def assert_y64(self, y, y64, what):
        err = rel64(y, y64)
        self.assertLessEqual(err, TOL, "%s: rel %.3g vs y64 > %.3g" % (what, err, TOL))

    def assert_ref(self, y, ref, mag, what, tol=TOL):
        err = rel_err(y, ref, mag)
        self.assertLessEqual(err, tol, "%s: rel %.3g > %.3g" % (what, err, tol))

    def assert_split_loaded(self, d, what, n, ranks):
        """Each rank logged that it loaded its part [a, b) of n, by the uneven rule."""
        got = sorted((int(r), w, int(a), int(b), int(o)) for r, w, a, b, o in
                     LOADED_RE.findall(d.log()))
        want, first = [], 0
        for r, c in enumerate(split(n, ranks)):
            want.append((r, what, first, first + c, n))
            first += c
        self.assertEqual(got, want, d.log_tail())

    def assert_one_collective_per_job(self, d, ranks):
        """One all-reduce per job; none at one rank, whose partial sum is the answer."""
        jobs = d.metric("tpd_batch_rows_count")
        self.assertGreater(jobs, 0)
        self.assertEqual(d.metric("tpd_collectives_total"), jobs if ranks > 1 else 0,
                         "not one all-reduce per job at %d ranks" % ranks)


class TestCheckpointBlocks(BlockCase):
    """The block and row-parallel cases of cases.json at N = 1..4."""

    def test_blocks(self):
        modules = {}
        for c in BLOCKS:
            modules.setdefault((c["checkpoint"], c["module"]), []).append(c)
        self.assertEqual(len(BLOCKS), 5, "cases.json changed")
        rng = np.random.default_rng(5)
        for (ckpt_name, module), cases in modules.items():
            ckpt = os.path.join(HF_DIR, ckpt_name)
            layers = layers_of(cases[0])
            gated = len(layers) == 3
            act = ACT[cases[0]["kind"]]
            inter = layers[0][0].shape[0]
            hidden = layers[0][0].shape[1]
            x64 = rng.standard_normal((64, hidden)).astype(np.float32)
            ref64, mag64 = block_reference(x64, layers, act, gated)
            for ranks in (1, 2, 3, 4):
                with self.subTest(module=module, ranks=ranks):
                    d = self.serve(ckpt, "--block", module, ranks=ranks)
                    what = "%s %s at %d ranks" % (ckpt_name, module, ranks)
                    for case in cases:  # 2-D and 3-D, as PyTorch ran them
                        x = np.load(os.path.join(HF_DIR, case["x"]))
                        y64 = np.load(os.path.join(HF_DIR, case["y64"]))
                        y = triton_infer(d.addr, x)
                        self.assert_y64(y, y64, what + " " + case["name"])
                        ref, mag = block_reference(x.reshape(-1, hidden), layers, act, gated)
                        self.assert_ref(y.reshape(-1, hidden), ref, mag, what + " (numpy ref)")
                    # batch 1 and batch 64, against the NumPy reference
                    self.assert_ref(triton_infer(d.addr, x64[:1]), ref64[:1], mag64[:1],
                                    what + " batch 1")
                    y = triton_infer(d.addr, x64)
                    self.assert_ref(y, ref64, mag64, what + " batch 64")
                    # batch-invariant: a row's bits do not depend on what it came with
                    self.assertEqual(triton_infer(d.addr, x64[7:8]).tobytes(), y[7:8].tobytes(),
                                     what + ": row 7 alone differs from row 7 of the batch")
                    md = metadata(d)
                    self.assertEqual((md["kind"], md["activation"], md["block"]),
                                     ("gated" if gated else "mlp", act, module), what)
                    self.assertEqual(md["intermediate"], str(inter), what)
                    self.assertEqual(md["split"], "intermediate", what)
                    self.assertEqual(md["shard_rows"], ",".join(map(str, split(inter, ranks))))
                    self.assertEqual(md["weight_tensor"],
                                     ",".join(w["tensor"] for w in cases[0]["weights"]))
                    self.assert_split_loaded(d, "intermediate", inter, ranks)
                    self.assert_one_collective_per_job(d, ranks)
                    if ranks == 3:  # the C reference too, through tpclient
                        xp = os.path.join(HF_DIR, cases[-1]["x"])
                        res = d.client("forward", xp, "--verify", ckpt, "--block", module)
                        self.assertEqual(res.rc, 0, repr(res))
                        self.assertIn(": ok", res.out)
                    d.stop()

    def test_row_parallel(self):
        self.assertEqual(len(ROWS), 2, "cases.json changed")
        for case in ROWS:
            ckpt = os.path.join(HF_DIR, case["checkpoint"])
            x = np.load(os.path.join(HF_DIR, case["x"]))
            y64 = np.load(os.path.join(HF_DIR, case["y64"]))
            (W, b), = layers_of(case)
            rng = np.random.default_rng(6)
            x64 = rng.standard_normal((64, case["in"])).astype(np.float32)
            ref, mag = reference(x64, W, b)
            for ranks in (1, 2, 3, 4):
                with self.subTest(case=case["name"], ranks=ranks):
                    d = self.serve(ckpt, "--weight", case["module"], "--parallel", "row",
                                   ranks=ranks)
                    what = "%s row-parallel at %d ranks" % (case["name"], ranks)
                    self.assert_y64(triton_infer(d.addr, x), y64, what)
                    self.assert_y64(self.forward(d, x), y64, what + " (tpclient)")
                    self.assert_ref(triton_infer(d.addr, x64), ref, mag, what + " batch 64")
                    self.assert_ref(triton_infer(d.addr, x64[3]), ref[3], mag[3], what + " 1-d")
                    md = metadata(d)
                    self.assertEqual((md["kind"], md["split"]), ("row", "inputs"), what)
                    self.assertEqual(md["shard_rows"],
                                     ",".join(map(str, split(case["in"], ranks))))
                    self.assert_split_loaded(d, "inputs", case["in"], ranks)
                    self.assert_one_collective_per_job(d, ranks)
                    d.stop()


def write_block(path, names, hidden, inter, seed, bias=True, config=None):
    """A generated block in directory path: layers named names (gated: gate, up, down; else fc,
    proj), stored [out, in] in F32, with biases; -> [(W, b)]."""
    from safetensors.numpy import save_file
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors, layers = {}, []
    shapes = [(inter, hidden)] * (len(names) - 1) + [(hidden, inter)]
    for name, (o, i) in zip(names, shapes):
        W = (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)
        b = (rng.standard_normal(o) * 0.2).astype(np.float32) if bias else None
        tensors[name + ".weight"] = W
        if bias:
            tensors[name + ".bias"] = b
        layers.append((W, b))
    save_file(tensors, os.path.join(path, "model.safetensors"))
    if config is not None:
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f)
    return layers


class TestGeneratedBlocks(BlockCase):

    def test_every_activation_uneven_with_biases(self):
        hidden, inter = 48, 37  # 37 splits 19,18 / 13,12,12 / 10,9,9,9
        mlp = "model.layers.3.mlp"
        ckpt = self.path("gated")
        layers = write_block(ckpt, [mlp + ".gate_proj", mlp + ".up_proj", mlp + ".down_proj"],
                             hidden, inter, seed=3,
                             config={"model_type": "llama", "hidden_act": "silu", "mlp_bias": True})
        x = (np.random.default_rng(4).standard_normal((2, 5, hidden)) * 2).astype(np.float32)
        for act, ranks in (("silu", 2), ("gelu", 3), ("gelu_tanh", 4), ("relu", 3)):
            with self.subTest(act=act, ranks=ranks):
                d = self.serve(ckpt, "--block", mlp, "--act", act, ranks=ranks)
                ref, mag = block_reference(x.reshape(-1, hidden), layers, act, True)
                y = triton_infer(d.addr, x)
                self.assertEqual(y.shape, (2, 5, hidden))
                self.assert_ref(y.reshape(-1, hidden), ref, mag, "gated %s at %d" % (act, ranks))
                self.assertEqual(metadata(d)["bias_tensor"],
                                 ",".join(mlp + m + ".bias" for m in
                                          (".gate_proj", ".up_proj", ".down_proj")))
                # the same block without its biases is another answer, and says so
                if act == "relu":
                    res = d.client("forward", self.npy(x), "--verify", ckpt, "--block", mlp,
                                   "--act", act, "--no-bias")
                    self.assertEqual(res.rc, 2, repr(res))
                    res = d.client("forward", self.npy(x), "--verify", ckpt, "--block", mlp,
                                   "--act", act)
                    self.assertEqual(res.rc, 0, repr(res))
                d.stop()
        # mlp_bias true with the biases gone is an incomplete checkpoint
        write_block(ckpt, [mlp + ".gate_proj", mlp + ".up_proj", mlp + ".down_proj"], hidden,
                    inter, seed=3, bias=False,
                    config={"model_type": "llama", "hidden_act": "silu", "mlp_bias": True})
        self.assertIn("mlp_bias true", self.refused(ckpt, "--block", mlp, "--cpu", "2"))

    def test_other_architectures(self):
        # OPT/Phi-style fc1 -> fc2 with biases, GPT-NeoX's dense_h_to_4h, Mixtral's w1/w3/w2
        for names, config, act, gated in (
                (["model.decoder.layers.0.fc1", "model.decoder.layers.0.fc2"],
                 {"model_type": "opt", "activation_function": "relu"}, "relu", False),
                (["gpt_neox.layers.0.mlp.dense_h_to_4h", "gpt_neox.layers.0.mlp.dense_4h_to_h"],
                 {"model_type": "gpt_neox", "hidden_act": "gelu"}, "gelu", False),
                (["model.layers.0.block_sparse_moe.experts.1.w1",
                  "model.layers.0.block_sparse_moe.experts.1.w3",
                  "model.layers.0.block_sparse_moe.experts.1.w2"],
                 {"model_type": "mixtral", "hidden_act": "silu"}, "silu", True)):
            with self.subTest(names[0]):
                ckpt = self.path(names[0].replace(".", "_"))
                module = names[0].rsplit(".", 1)[0]
                layers = write_block(ckpt, names, 40, 30, seed=len(names[0]), config=config)
                d = self.serve(ckpt, "--block", module, ranks=4)
                x = np.random.default_rng(8).standard_normal((9, 40)).astype(np.float32)
                ref, mag = block_reference(x, layers, act, gated)
                self.assert_ref(triton_infer(d.addr, x), ref, mag, module)
                self.assertEqual(metadata(d)["activation"], act)
                d.stop()

    def test_row_layer_of_one_output(self):
        # out = 1: the reduce's stripes leave ranks 1.. without a column
        from safetensors.numpy import save_file
        rng = np.random.default_rng(9)
        W = rng.standard_normal((1, 37)).astype(np.float32)
        b = np.array([0.5], np.float32)
        path = self.path("one.safetensors")
        save_file({"weight": W, "bias": b}, path)
        d = self.serve(path, "--parallel", "row", ranks=4)
        x = rng.standard_normal((64, 37)).astype(np.float32)
        ref, mag = reference(x, W, b)
        self.assert_ref(triton_infer(d.addr, x), ref, mag, "row layer of one output")
        d.stop()

    def npy(self, x):
        p = self.path("x%d.npy" % id(x))
        np.save(p, x)
        return p


class TestRefused(BlockCase):

    def test_refused(self):
        llama = os.path.join(HF_DIR, "llama-sharded-bf16")
        mlp = "model.layers.0.mlp"
        self.assertIn("--weight", self.refused(llama, "--block", mlp, "--weight", "x"))
        self.assertIn("--parallel row", self.refused(llama, "--block", mlp, "--parallel", "row"))
        self.assertIn("--block", self.refused(llama, "--weight", "lm_head", "--act", "silu"))
        self.assertIn("silu, gelu", self.refused(llama, "--block", mlp, "--act", "swiglu"))
        self.assertIn("column or row", self.refused(llama, "--weight", "lm_head",
                                                    "--parallel", "diagonal"))
        err = self.refused(llama, "--block", "model.layers.0.self_attn", "--cpu", "2")
        self.assertIn("gate_proj", err)
        # a split that leaves a rank nothing: 5 inputs over 6 ranks
        from safetensors.numpy import save_file
        path = self.path("narrow.safetensors")
        save_file({"weight": np.ones((8, 5), np.float32)}, path)
        self.assertIn("5 inputs cannot be split", self.refused(path, "--parallel", "row",
                                                               "--cpu", "6"))
        # a fused gate_up_proj (Phi-3) is a concatenation tpd does not split
        fused = self.path("fused")
        os.makedirs(fused)
        save_file({"model.layers.0.mlp.gate_up_proj.weight": np.ones((16, 4), np.float32),
                   "model.layers.0.mlp.down_proj.weight": np.ones((4, 8), np.float32)},
                  os.path.join(fused, "model.safetensors"))
        self.assertIn("gate_up_proj", self.refused(fused, "--block", mlp, "--act", "silu"))


class TestKillUnderLoad(BlockCase):

    def test_kill_a_rank_while_blocks_compute(self):
        hidden, inter, ranks = 256, 688, 3
        mlp = "model.layers.0.mlp"
        ckpt = self.path("kill")
        layers = write_block(ckpt, [mlp + ".gate_proj", mlp + ".up_proj", mlp + ".down_proj"],
                             hidden, inter, seed=12, bias=False,
                             config={"model_type": "llama", "hidden_act": "silu"})
        d = self.start_daemon(ckpt, "--cpu", ranks, "--block", mlp, "--restart-backoff-ms", 100)
        ld = Load(d.addr, "kill", np.zeros((1, hidden), np.float32), None, clients=3, seed=2,
                  ref=lambda x: block_reference(x, layers, "silu", True))
        self.addCleanup(ld.stop, 5)
        ld.start()
        self.assertTrue(ld.wait_ok(20), "no answers before the kill\n" + d.log_tail())
        probe = tgrpc.InferenceServerClient(url=d.addr)
        self.addCleanup(probe.close)
        for k, rank in enumerate((1, 2)):
            before = d.worker_pids()
            ld.wait_inflight(2)
            t_kill = time.monotonic()
            os.kill(before[rank], signal.SIGKILL)
            while time.monotonic() - t_kill < 30 and probe.is_server_ready(client_timeout=10):
                time.sleep(0.005)
            while time.monotonic() - t_kill < 30 and not probe.is_server_ready(client_timeout=10):
                time.sleep(0.01)
            self.assertTrue(probe.is_server_ready(), "kill %d: not ready again\n%s" % (
                k, d.log_tail()))
            self.assertEqual(wait_gone(before.values()), [], "old workers left running")
            self.assertTrue(ld.wait_ok(10, since=time.monotonic()),
                            "kill %d: no answers after the rebuild\n%s" % (k, d.log_tail()))
        hung = ld.stop()
        self.assertEqual(hung, [], "clients hung\n" + d.log_tail())
        self.assertEqual(ld.errors, [])
        self.assertEqual(ld.wrong(), [], "WRONG ANSWERS")
        out = ld.outcomes()
        self.assertEqual(set(out) - {"OK", "UNAVAILABLE"}, set(), dict(out))
        self.assertGreater(out.get("UNAVAILABLE", 0), 0,
                           "no request failed at either kill: the kills missed the load")
        print("block kill under load: outcomes %s, 0 wrong answers" % dict(out))
        d.stop()


if __name__ == "__main__":
    unittest.main(verbosity=2)
