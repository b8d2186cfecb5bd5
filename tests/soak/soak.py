"""soak -- tpd under steady concurrent load with random worker kills, for a fixed time.

32 concurrent clients (tritonclient.grpc, one connection each) send ModelInfer requests with
mixed batch sizes to one tpd (3 CPU ranks) for --duration seconds, while a worker picked at
random is killed with SIGKILL every --kill-min..--kill-max seconds. Every answer is checked
against the float64 NumPy reference. At the end it reports requests served, failures by status
code, wrong answers, and tpd's resident memory (RSS) before the load, once warm (after a quarter
of the run) and at the end.

Exit status 0 only if: no wrong answer, no client hung, no failure other than UNAVAILABLE (what a
killed worker group answers), answers were served after the last kill, tpd is still running and
ready, and RSS grew by at most --rss-growth-mib between the warm mark and the end (at least
64 MiB when tpd runs under ASan, whose quarantine keeps freed memory: the soak caps it at 16 MiB
for tpd, and LeakSanitizer checks leaks there).

    TPD=build/bin/tpd TPCLIENT=build/bin/tpclient TP_SEED_DIR=tests/data/seed \\
        python tests/soak/soak.py --duration 600
(or --build build instead of the three variables). ctest runs a 20-second version (soak_short).
"""

import argparse
import os
import random
import shutil
import signal
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))


def rss_mib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def sanitized(pid):
    """True when pid runs with AddressSanitizer (its quarantine holds freed memory up to 256 MiB
    and its shadow grows with it, so RSS says little there; LeakSanitizer checks leaks instead)."""
    try:
        with open("/proc/%d/maps" % pid) as f:
            return "libasan" in f.read()
    except OSError:
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=60, help="seconds of load (default 60)")
    ap.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    ap.add_argument("--cpu", type=int, default=3, help="worker ranks (default 3)")
    ap.add_argument("--kill-min", type=float, default=2.0, help="seconds between kills, at least")
    ap.add_argument("--kill-max", type=float, default=6.0, help="seconds between kills, at most")
    ap.add_argument("--rss-growth-mib", type=float, default=32.0,
                    help="most RSS growth allowed from the warm mark to the end (default 32)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--build", help="build directory (sets TPD, TPCLIENT and TP_SEED_DIR)")
    a = ap.parse_args()
    if a.build:
        os.environ["TPD"] = os.path.join(a.build, "bin", "tpd")
        os.environ["TPCLIENT"] = os.path.join(a.build, "bin", "tpclient")
        os.environ.setdefault("TP_SEED_DIR", os.path.join(HERE, "..", "data", "seed"))

    import tpdtest
    from loadgen import Load

    tpdtest.check_environment()
    work = tempfile.mkdtemp(prefix="tpd-soak-")
    d = None
    try:
        in_, out = 512, a.cpu * 200
        wpath = os.path.join(work, "soak.safetensors")
        W, b = tpdtest.make_layer(wpath, out, in_, bias=True, dtype="F32", seed=a.seed)
        # Under ASan the quarantine keeps up to 256 MiB of freed memory, and how fast it fills
        # depends on the request rate, not on tpd: cap it, so that RSS still says something.
        # (The variable is read only by a sanitized build; LeakSanitizer still checks leaks.)
        asan = os.environ.get("ASAN_OPTIONS", "")
        env = {"ASAN_OPTIONS": (asan + ":" if asan else "") + "quarantine_size_mb=16"}
        d = tpdtest.Daemon(work, wpath, ["--cpu", a.cpu, "--restart-backoff-ms", 100,
                                         "--max-batch", 64], name="soak", env=env)
        d.start()
        pid = d.proc.pid
        rss_start = rss_mib(pid)
        rss_limit = a.rss_growth_mib
        if sanitized(pid):
            rss_limit = max(rss_limit, 64.0)
            print("soak: tpd runs under ASan: RSS growth bound %.0f MiB" % rss_limit)
        ld = Load(d.addr, "soak", W, b, clients=a.clients,
                  batches=(1, 2, 3, 5, 8, 13, 21, 34, 55, 64), seed=a.seed, pool=4).start()
        rng = random.Random(a.seed)
        t0 = time.monotonic()
        t_end = t0 + a.duration
        t_warm = t0 + a.duration / 4
        rss_warm = None
        next_kill = t0 + rng.uniform(a.kill_min, a.kill_max)
        kills, last_kill = 0, None
        samples, next_sample = [], t0
        while time.monotonic() < t_end:
            now = time.monotonic()
            if now >= next_sample and d.running():
                samples.append(rss_mib(pid))
                next_sample += a.duration / 10
            if rss_warm is None and now >= t_warm:
                rss_warm = rss_mib(pid)
            if now >= next_kill and now < t_end - 3:
                pids = d.worker_pids()
                victim = pids[rng.randrange(len(pids))]
                try:
                    os.kill(victim, signal.SIGKILL)
                    kills += 1
                    last_kill = now
                except ProcessLookupError:
                    pass
                next_kill = now + rng.uniform(a.kill_min, a.kill_max)
            if not d.running():
                break
            time.sleep(0.05)
        if rss_warm is None:
            rss_warm = rss_mib(pid)
        if last_kill is not None:
            ld.wait_ok(1, since=last_kill + 0.001, timeout=30)
        hung = ld.stop()
        alive = d.running()
        rss_end = rss_mib(pid) if alive else float("nan")
        ready = alive and d.client("health", "--timeout", "5000", timeout=20).rc == 0
        recs = ld.snapshot()
        outcomes = ld.outcomes()
        served = outcomes.get("OK", 0)
        wrong = ld.wrong()
        failures = {k: v for k, v in outcomes.items() if k not in ("OK", "WRONG")}
        after_last = sum(1 for r in recs if r.outcome == "OK" and last_kill is not None and
                         r.t0 > last_kill)
        elapsed = time.monotonic() - t0
        rows = sum(r.rows for r in recs if r.outcome == "OK")

        print("soak: %.0f s, %d clients, %d ranks, %d worker kills" % (
            elapsed, a.clients, a.cpu, kills))
        print("soak: requests served %d (%d rows, %.0f requests/s)" % (
            served, rows, served / elapsed if elapsed else 0))
        print("soak: failures by status code: %s" % (
            ", ".join("%s %d" % kv for kv in sorted(failures.items())) or "none"))
        print("soak: wrong answers: %d" % len(wrong))
        print("soak: tpd RSS: start %.1f MiB, warm %.1f MiB, end %.1f MiB (growth after warm "
              "%.1f MiB, limit %.0f)" % (rss_start, rss_warm, rss_end, rss_end - rss_warm,
                                         rss_limit))
        print("soak: tpd RSS every tenth of the run: %s MiB" % " ".join("%.1f" % v
                                                                    for v in samples))
        problems = []
        if wrong:
            problems.append("%d wrong answers, e.g. %s" % (len(wrong), wrong[0].detail))
        if hung:
            problems.append("clients hung: %s" % hung)
        if ld.errors:
            problems.append("client errors: %s" % ld.errors[:3])
        other = {k: v for k, v in failures.items() if k != "UNAVAILABLE"}
        if other:
            problems.append("failures other than UNAVAILABLE: %s" % other)
        if not alive:
            problems.append("tpd died")
        elif not ready:
            problems.append("tpd not ready at the end")
        if served == 0 or (kills and after_last == 0):
            problems.append("no answers %s" % ("at all" if served == 0 else "after the last kill"))
        if not rss_end - rss_warm <= rss_limit:
            problems.append("RSS grew %.1f MiB after the warm mark" % (rss_end - rss_warm))
        if problems:
            print("soak: FAILED: " + "; ".join(problems))
            print(d.log_tail(40))
            return 1
        print("soak: ok")
        d.stop()
        return 0
    finally:
        if d is not None:
            d.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
