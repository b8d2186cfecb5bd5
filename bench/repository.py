#!/usr/bin/env python3
"""repository.py -- what serving many models costs: one model's requests/s while another is
loaded and unloaded in a loop, against the same with no load or unload, in the same run; and the
memory a loaded model takes, against its shard bytes and slots.

    python3 bench/repository.py [--cpu N] [--seconds S] [--rounds R]   (after scripts/build.sh)

One tpd (--model-repository, --model-control-mode explicit) with two models of a layer file this
script writes (standard library only: a safetensors file is a JSON header and the raw floats):

  busy    IN x OUT, loaded at start, under `tpclient bench` (C clients, B rows a request);
  cycled  the same shape, loaded and unloaded over REST back to back while busy is measured
          (rounds "cycling"), or left alone (rounds "quiet"); rounds alternate.

It prints each round's requests/s and the median ratio cycling / quiet, and, for the memory, every
rank's resident memory before and after a load of cycled, against that rank's share of the
weights (FP32, as the cpu ranks hold them) plus the model's arena (its slots), which tpd's log
states. The environment is passed unchanged (OPENBLAS_CORETYPE and the like)."""

import argparse
import json
import os
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchutil import cpu_model, stop_tpd  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "build", "bin")


class BenchError(Exception):
    pass


def write_layer(path, out, in_):
    """A [out, in_] F32 weight and [out] bias of small values that vary (no NaN, no overflow)."""
    w = struct.pack("<%df" % (out * in_), *((((i * 7919) % 1000) - 500) * 1e-5
                                             for i in range(out * in_)))
    b = struct.pack("<%df" % out, *(i * 1e-4 for i in range(out)))
    header = {"weight": {"dtype": "F32", "shape": [out, in_], "data_offsets": [0, len(w)]},
              "bias": {"dtype": "F32", "shape": [out], "data_offsets": [len(w), len(w) + len(b)]}}
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + w + b)
    return len(w) + len(b)


def rss_kib(pid):
    """(RssAnon, RssShmem) of pid in KiB: its private memory, and the shared memory it maps."""
    got = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k = line.split(":")[0]
            if k in ("RssAnon", "RssShmem"):
                got[k] = int(line.split()[1])
    if len(got) != 2:
        raise BenchError("no RssAnon/RssShmem for pid %d" % pid)
    return got["RssAnon"], got["RssShmem"]


def post(http, path):
    req = urllib.request.Request("http://%s%s" % (http, path), data=b"{}", method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.read()


def parse_kv(text, prefix):
    lines = [ln for ln in text.splitlines() if ln.startswith(prefix)]
    if not lines:
        raise BenchError("no '%s' line in:\n%s" % (prefix, text[-2000:]))
    return {k: v for k, _, v in (item.partition("=") for item in lines[-1][len(prefix):].split())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", type=int, default=2)
    ap.add_argument("--in", dest="in_", type=int, default=1024)
    ap.add_argument("--out", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pause-ms", type=float, action="append",
                    help="pause after each load and each unload of the loop; repeatable, one "
                         "set of rounds each (default: 0, back to back, and 100)")
    a = ap.parse_args()
    a.pause_ms = a.pause_ms or [0.0, 100.0]
    tmp = tempfile.mkdtemp(prefix="tpd-repo-bench-")
    repo = os.path.join(tmp, "models")
    os.makedirs(repo)
    nbytes = write_layer(os.path.join(tmp, "layer.safetensors"), a.out, a.in_)
    for name in ("busy", "cycled"):
        with open(os.path.join(repo, name + ".json"), "w") as f:
            json.dump({"weights": "../layer.safetensors", "slots": 4, "max_batch": 64}, f)
    sock = os.path.join(tmp, "tpd.sock")
    logp = os.path.join(tmp, "tpd.log")
    log = open(logp, "w")
    p = subprocess.Popen([os.path.join(BIN, "tpd"), "--model-repository", repo, "--cpu",
                          str(a.cpu), "--model-control-mode", "explicit", "--load-model", "busy",
                          "--listen", "unix:" + sock, "--http-listen", "127.0.0.1:0",
                          "--metrics-listen", "off", "--config", "none"],
                         stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not re.search(r"ready: serving", open(logp).read()):
            if p.poll() is not None or time.monotonic() > deadline:
                raise BenchError("tpd did not start:\n" + open(logp).read()[-2000:])
            time.sleep(0.05)
        text = open(logp).read()
        http = re.search(r"REST API on http://(\S+)/v2", text).group(1)
        workers = [int(x) for x in re.findall(r"started worker rank \d+ pid (\d+)", text)]
        print("machine: %s, %d CPUs; %d cpu ranks; two models of %d x %d F32 (+bias), %.1f MiB "
              "of weights each" % (cpu_model(), os.cpu_count(), a.cpu, a.out, a.in_,
                                   nbytes / 2**20))

        # memory: a load of cycled, rank by rank
        before = [rss_kib(w) for w in workers]
        post(http, "/v2/repository/models/cycled/load")
        time.sleep(0.2)
        after = [rss_kib(w) for w in workers]
        post(http, "/v2/repository/models/cycled/unload")
        time.sleep(0.2)
        gone = [rss_kib(w) for w in workers]
        slot_bytes = 4 * 64 * (a.in_ + a.out) * 4  # slots x max_batch x (in + out) floats
        for r, (b0, b1, b2) in enumerate(zip(before, after, gone)):
            share = nbytes / a.cpu
            print("rank %d: private memory %d -> %d KiB on load (+%.2f MiB = %.3fx its share of "
                  "the weights, %.2f MiB), %d KiB after unload; shared (the slots, %.2f MiB) "
                  "%d -> %d -> %d KiB" % (
                      r, b0[0], b1[0], (b1[0] - b0[0]) / 1024, (b1[0] - b0[0]) * 1024 / share,
                      share / 2**20, b2[0], slot_bytes / 2**20, b0[1], b1[1], b2[1]))

        for pause in a.pause_ms:
            throughput(a, sock, http, pause)
    finally:
        stop_tpd(p, BenchError)
        log.close()


def throughput(a, sock, http, pause_ms):
    """Quiet and cycling rounds, alternating, with pause_ms after each load and unload."""
    if True:
        bench = [os.path.join(BIN, "tpclient"), "--server", "unix:" + sock, "bench", "--model",
                 "busy", "--rows", str(a.rows), "--concurrency", str(a.concurrency),
                 "--duration", str(a.seconds), "--warmup", "5"]
        res = {"quiet": [], "cycling": []}
        cycles = []
        for rnd in range(a.rounds):
            for kind in ("quiet", "cycling"):
                stop = threading.Event()
                n = [0]

                def cycle():
                    while not stop.is_set():
                        post(http, "/v2/repository/models/cycled/load")
                        stop.wait(pause_ms / 1000)
                        post(http, "/v2/repository/models/cycled/unload")
                        stop.wait(pause_ms / 1000)
                        n[0] += 1

                t = threading.Thread(target=cycle, daemon=True)
                if kind == "cycling":
                    t.start()
                out = subprocess.run(bench, capture_output=True, text=True, timeout=300)
                stop.set()
                if kind == "cycling":
                    t.join()
                    cycles.append(n[0])
                if out.returncode != 0:
                    raise BenchError("tpclient bench failed:\n%s%s" % (out.stdout, out.stderr))
                kv = parse_kv(out.stdout, "bench-result:")
                rps = float(kv["rps"])
                res[kind].append(rps)
                print("round %d %-8s %8.1f req/s  p50 %s ms%s" % (
                    rnd + 1, kind, rps, kv.get("p50_ms", "?"),
                    "  (%d load+unload cycles of the other model)" % n[0]
                    if kind == "cycling" else ""))
        ratios = [c / q for c, q in zip(res["cycling"], res["quiet"])]
        print("busy model, %d clients x %d rows: quiet %.1f req/s, while the other model is "
              "loaded and unloaded in a loop (pause %g ms, %.1f cycles/s) %.1f req/s: ratio "
              "%.3f (median of %d rounds; target >= 0.9)" % (
                  a.concurrency, a.rows, statistics.median(res["quiet"]), pause_ms,
                  statistics.median(cycles) / a.seconds, statistics.median(res["cycling"]),
                  statistics.median(ratios), a.rounds))


if __name__ == "__main__":
    try:
        main()
    except BenchError as e:
        print("repository.py: %s" % e, file=sys.stderr)
        sys.exit(1)
