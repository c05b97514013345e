"""Latency of `bigrec serve` under concurrent clients; prints figures, asserts nothing.

    python benchmarks/bench_serve.py --run runs/demo --clients 8 --requests 50

Starts `bigrec serve` on the run folder (a free loopback port), warms it up, measures a single
client's latency, then ``--clients`` clients each sending ``--requests`` requests back to
back, and prints p50/p90/p99 latency, throughput and the server's batch sizes. ``--soak``: the
same clients, where every tenth request is poisoned (a lone surrogate in a title, k=0, an unknown
field) and every 25th carries a 10 MB body; it prints the valid requests' failures and latency,
what the poisoned ones got, and the server's RSS at the start and the end. Histories come
from the run's prepared test rows (else catalogue ids). Without a run folder (``make bench``
on a fresh clone) it builds the tests' tiny run folder: those figures measure the service's
machinery on a random 2-layer model, not SmolLM2. ``--url`` measures a server already running.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from common import free_port

ROOT = Path(__file__).resolve().parents[1]


def histories_for(run: Path, count: int, seed: int = 0) -> list[list[int]]:
    from bigrec.app.run_manifest import RunManifest

    manifest = RunManifest.load(run)
    data = manifest.path(run, "data")
    rows = []
    if data is not None and (data / "test.json").is_file():
        rows = [r["history_item_id"] for r in json.loads((data / "test.json").read_text()) if r.get("history_item_id")]
    rng = random.Random(seed)
    if not rows:
        n = sum(1 for line in manifest.path(run, "catalog").open() if line.strip())
        rows = [[rng.randrange(n) for _ in range(5)] for _ in range(count)]
    return [list(rows[rng.randrange(len(rows))]) for _ in range(count)]


def start_server(run: Path, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "bigrec", "serve", "--run", str(run), "--port", str(port), "--log_level", "warning",
           "--max_batch", str(args.max_batch), "--batch_window_ms", str(args.batch_window_ms)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bigrec serve exited with {proc.returncode}:\n{proc.stderr.read()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"bigrec serve did not answer within {args.start_timeout}s")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def load(url: str, histories: list[list[int]], clients: int, per_client: int, k: int, use_ci: bool):
    """Latencies (seconds) of every successful request, the errors, and the wall time."""
    def client(n: int) -> tuple[list[float], list[str]]:
        times, errors = [], []
        with httpx.Client(base_url=url, timeout=600) as c:
            for i in range(per_client):
                history = histories[(n * per_client + i) % len(histories)]
                start = time.perf_counter()
                r = c.post("/recommend", json={"history": history, "k": k, "use_ci": use_ci})
                if r.status_code == 200:
                    times.append(time.perf_counter() - start)
                else:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
        return times, errors

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        parts = list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    return [t for ts, _ in parts for t in ts], [e for _, es in parts for e in es], wall


POISONS = [b'{"history": ["\\ud800 Toy"], "k": 3}', b'{"history": [1, 2], "k": 0}',
           b'{"history": [1, 2], "k": 3, "surprise": true}']


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def soak(url: str, histories: list[list[int]], clients: int, per_client: int, k: int, minutes: float = 0.0):
    """Valid requests' latencies and failures, and the status codes the poisoned ones got; with
    ``minutes``, each client sends until that much time has passed instead of ``per_client`` requests."""
    deadline = time.monotonic() + minutes * 60 if minutes else None
    big = b'{"history": [1], "k": 3, "pad": "' + b"x" * (10 << 20) + b'"}'

    def client(n: int) -> tuple[list[float], list[str], list[int]]:
        times, failures, poisoned = [], [], []
        with httpx.Client(base_url=url, timeout=600) as c:
            for i in itertools.count(1):
                if (deadline is None and i > per_client) or (deadline is not None and time.monotonic() > deadline):
                    break
                body = big if i % 25 == 0 else POISONS[(n + i) % len(POISONS)] if i % 10 == 0 else None
                if body is not None:
                    try:
                        r = c.post("/recommend", content=body, headers={"content-type": "application/json"})
                        poisoned.append(r.status_code)
                    except httpx.TransportError as exc:  # the server may close a connection it refused
                        poisoned.append(-1 if "413" not in str(exc) else 413)
                    continue
                start = time.perf_counter()
                r = c.post("/recommend", json={"history": histories[(n * per_client + i) % len(histories)], "k": k})
                if r.status_code == 200:
                    times.append(time.perf_counter() - start)
                else:
                    failures.append(f"{r.status_code}: {r.text[:200]}")
        return times, failures, poisoned

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        parts = list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    return ([t for p in parts for t in p[0]], [f for p in parts for f in p[1]], [c for p in parts for c in p[2]],
            wall)


class RssSampler(threading.Thread):
    """The server's RSS every ``every`` seconds while a soak runs: (seconds since start, MiB)."""

    def __init__(self, pid: int, every: float):
        super().__init__(daemon=True)
        self.pid, self.every, self.samples = pid, every, []
        self.done = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self.done.is_set():
            self.samples.append((time.monotonic() - start, rss_mib(self.pid)))
            self.done.wait(self.every)

    def stop(self) -> list[tuple[float, float]]:
        self.done.set()
        self.join()
        self.samples.append((self.samples[-1][0] + self.every if self.samples else 0.0, rss_mib(self.pid)))
        return self.samples


def rss_summary(samples: list[tuple[float, float]]) -> str:
    """RSS at each quarter of the soak and its growth over the last half (MiB a minute, least squares)."""
    quarters = [samples[min(len(samples) - 1, round(q * (len(samples) - 1)))] for q in (0, 0.25, 0.5, 0.75, 1)]
    tail = samples[len(samples) // 2:]
    slope = float("nan")
    if len(tail) >= 2:
        mt, mr = statistics.fmean(t for t, _ in tail), statistics.fmean(r for _, r in tail)
        var = sum((t - mt) ** 2 for t, _ in tail)
        slope = 60 * sum((t - mt) * (r - mr) for t, r in tail) / var if var else float("nan")
    return ("server RSS at 0, 1/4, 1/2, 3/4 and the end of the soak: "
            + ", ".join(f"{r:.0f} MiB ({t / 60:.1f} min)" for t, r in quarters)
            + f"; over the second half {slope:+.2f} MiB/min")


def plot_rss(samples: list[tuple[float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([t / 60 for t, _ in samples], [r for _, r in samples])
    ax.set_xlabel("minutes of soak")
    ax.set_ylabel("server RSS (MiB)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(label: str, times: list[float], errors: list[str], wall: float) -> None:
    ms = [t * 1000 for t in times]
    if not ms:
        print(f"{label}: no successful requests; errors: {errors[:3]}")
        return
    print(f"{label}: {len(ms)} ok, {len(errors)} errors in {wall:.1f}s ({len(ms) / wall:.2f} req/s); latency ms "
          f"p50 {percentile(ms, 50):.0f}  p90 {percentile(ms, 90):.0f}  p99 {percentile(ms, 99):.0f}  "
          f"max {max(ms):.0f}  mean {statistics.fmean(ms):.0f}")
    for e in errors[:3]:
        print(f"  error {e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo", help="finished run folder (default: runs/demo)")
    parser.add_argument("--url", default=None, help="measure a server already running here instead")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=50, help="requests per client")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--use_ci", action="store_true")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--max_batch", type=int, default=16)
    parser.add_argument("--batch_window_ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the server (0: default)")
    parser.add_argument("--start_timeout", type=float, default=900)
    parser.add_argument("--soak", action="store_true", help="poisoned and 10 MB requests among the valid ones")
    parser.add_argument("--soak_minutes", type=float, default=0.0,
                        help="--soak: clients send until this many minutes have passed (0: --requests each)")
    parser.add_argument("--rss_every", type=float, default=10.0, help="--soak: seconds between RSS samples")
    parser.add_argument("--rss_out", help="--soak: write the RSS samples here (JSON) and their plot beside (.png)")
    args = parser.parse_args()
    run = Path(args.run)
    build = args.url is None and not (run / "run.yaml").is_file()
    if build:  # the tests' tiny run folder: rerun with tests/ on PYTHONPATH (run_small's runs have it already)
        from device import use_working_tree

        use_working_tree()
    from peak import measure_peaks

    print(measure_peaks().line() + " (the machine the service shares; see bench_generate for its phases)",
          flush=True)

    tmp = None
    if build:
        from run_fixture import build_run

        tmp = tempfile.TemporaryDirectory()
        print(f"{run}/run.yaml not found: building the tests' tiny run folder (random 2-layer model; figures "
              "measure the service, not SmolLM2)", flush=True)
        run = build_run(Path(tmp.name))
    proc = None
    try:
        if args.url is None:
            started = time.perf_counter()
            proc, url = start_server(run, args)
            print(f"server up in {time.perf_counter() - started:.1f}s at {url}", flush=True)
        else:
            url = args.url.rstrip("/")
        info = httpx.get(f"{url}/health", timeout=30).json()["run"]
        print(f"run {info['run']}: {info['items']} items, beams {info['num_beams']}, device {info['device']} "
              f"{info['dtype']}, clients {args.clients} x {args.requests} requests, k {args.k}"
              f"{', use_ci' if args.use_ci else ''}")
        histories = histories_for(run, max(64, args.clients * args.requests)) if args.url is None else \
            [[i, i + 1, i + 2] for i in range(64)]
        report("warm-up", *load(url, histories, 1, args.warmup, args.k, args.use_ci))
        if args.soak:
            sampler = RssSampler(proc.pid, args.rss_every) if proc is not None else None
            if sampler is not None:
                sampler.start()
            times, failures, poisoned, wall = soak(url, histories, args.clients, args.requests, args.k,
                                                   args.soak_minutes)
            samples = sampler.stop() if sampler is not None else [(0.0, float("nan"))]
            rss0, rss1 = samples[0][1], samples[-1][1]
            length = f"{args.soak_minutes:g} min" if args.soak_minutes else f"x {args.requests}"
            report(f"soak, {args.clients} clients {length}: valid requests", times, failures, wall)
            codes = {c: poisoned.count(c) for c in sorted(set(poisoned))}
            print(f"soak: {len(failures)} failed valid requests of {len(times) + len(failures)}; poisoned "
                  f"{len(poisoned)} answered {codes}; server RSS {rss0:.0f} -> {rss1:.0f} MiB "
                  f"({100 * (rss1 / rss0 - 1):+.1f}%)")
            if sampler is not None:
                print(rss_summary(samples))
                if args.rss_out:
                    out = Path(args.rss_out)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text(json.dumps({"seconds": [t for t, _ in samples], "rss_mib": [r for _, r in samples]}))
                    plot_rss(samples, out.with_suffix(".png"))
                    print(f"RSS samples: {out}; plot: {out.with_suffix('.png')}")
            return
        report("1 client", *load(url, histories, 1, max(5, args.requests // 5), args.k, args.use_ci))
        before = httpx.get(f"{url}/health", timeout=30).json()["stats"]
        report(f"{args.clients} clients", *load(url, histories, args.clients, args.requests, args.k, args.use_ci))
        after = httpx.get(f"{url}/health", timeout=30).json()["stats"]
        batches = after["batches"] - before["batches"]
        served = after["requests"] - before["requests"]
        print(f"server: {batches} batches for {served} requests (mean {served / max(batches, 1):.2f}, max "
              f"{after['max_batch_size']}), model busy {after['model_busy_s'] - before['model_busy_s']:.1f}s")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
