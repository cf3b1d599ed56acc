"""Load test of `densenet serve` on the loopback interface: dynamic batching against
one-at-a-time serving, same model, same traffic, in one run.

For each mode a server process is started on 127.0.0.1 (a small random-weights DenseNet, so
nothing is downloaded), warmed up, then sent a bounded number of requests (one photograph each,
scikit-image's astronaut / chelsea / coffee as JPEG) from a fixed number of concurrent clients,
stopping early at a time limit. Reported per mode: requests/s, p50/p99 latency, errors, and the
batch sizes the server ran (from its /metrics histogram); then the throughput ratio.

    python benchmarks/bench_serve.py                      # 2,000 requests, 32 clients per mode
    python benchmarks/bench_serve.py --requests 200 --json serve.json

With ``--fairness`` it measures instead whether one client can stall the others: one batching
server, the same small requests first alone (idle), then while ``--heavy-clients`` other clients
send maximal requests back to back (``--heavy-images`` uniform PNGs whose pixels add up to the
per-request limit, 100 million by default); reported: p50/p99 of the small requests in both
phases, their ratio, and the heavy requests answered.

    python benchmarks/bench_serve.py --fairness --requests 200 --concurrency 4

With ``--latency`` it measures one client's answer time (requests sent one after another to a
server with the default batching) against its parts measured in this process after the server
stopped, on the same model, engine and threads: decoding and preprocessing one photograph, and the
model's latency at batch 1. Reported: the medians and their ratio (goal: at most 1.1).

    python benchmarks/bench_serve.py --latency --model densenet121 --requests 200
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from typing import NamedTuple

MODELS = {  # DenseNet(...) arguments; 1000 classes, ImageNet stem, 224x224 inputs
    "tiny": {"growth_rate": 4, "block_config": (2, 2), "num_init_features": 8},
    "small": {"growth_rate": 8, "block_config": (2, 4, 4), "num_init_features": 16},
    "densenet121": {"growth_rate": 32, "block_config": (6, 12, 24, 16), "num_init_features": 64},
}
HOST = "127.0.0.1"  # the only address this script sends traffic to


class Mode(NamedTuple):
    """How one server batches: its batch limit, its wait for company, and bucketed shapes."""

    max_batch: int
    max_wait_ms: float
    buckets: bool = False


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000, help="measured requests per mode")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent clients")
    p.add_argument("--model", choices=MODELS, default="small", help="random-weights DenseNet")
    p.add_argument("--max-batch", type=int, default=32, help="batch limit of the batching mode")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="batching mode's wait, ms")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads in the server (0: torch's default)"
    )
    p.add_argument("--rounds", type=int, default=10, help="alternating rounds per mode")
    p.add_argument("--time-limit", type=float, default=240, help="seconds per mode, at most")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument(
        "--device",
        default="cpu",
        help="where the server runs the model; on cuda the batching mode is also measured without "
        "buckets (padding to 1, 2, 4, ... max batch with a CUDA graph per size)",
    )
    p.add_argument(
        "--fairness",
        action="store_true",
        help="measure small requests' latency idle and beside clients sending maximal requests",
    )
    p.add_argument(
        "--latency",
        action="store_true",
        help="measure one client's answer time against decoding plus the model's own latency",
    )
    p.add_argument("--heavy-clients", type=int, default=1, help="--fairness: heavy clients")
    p.add_argument(
        "--heavy-images", type=int, default=4, help="--fairness: images per heavy request"
    )
    p.add_argument(
        "--max-request-pixels",
        type=int,
        default=100_000_000,
        help="the server's per-request pixel limit, which the heavy requests fill",
    )
    p.add_argument("--serve-port", type=int, help=argparse.SUPPRESS)  # internal: be the server
    p.add_argument("--serve-buckets", choices=["on", "off"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- the server process ----------------------------------------------------------------------


def run_server(args: argparse.Namespace) -> None:
    import torch

    import densenet
    from densenet.serve import ServeConfig, serve

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    classifier = densenet.Classifier(
        densenet.DenseNet(**MODELS[args.model]),
        device=args.device,
        batch_size=args.max_batch,
        buckets=args.serve_buckets == "on",
    )
    config = ServeConfig(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_request_pixels=args.max_request_pixels,
        max_pixels_in_flight=2 * args.max_request_pixels,
    )
    serve(
        classifier,
        config,
        host=HOST,
        port=args.serve_port,
        model_name=args.model,
        log_level="warning",
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, mode: Mode) -> tuple:
    port = free_port()
    command = [sys.executable, __file__, "--serve-port", str(port), "--model", args.model]
    command += ["--max-batch", str(mode.max_batch), "--max-wait-ms", str(mode.max_wait_ms)]
    command += ["--device", args.device, "--serve-buckets", "on" if mode.buckets else "off"]
    command += [
        "--threads",
        str(args.threads),
        "--max-request-pixels",
        str(args.max_request_pixels),
    ]
    return subprocess.Popen(command), f"http://{HOST}:{port}"


# ---- the clients -------------------------------------------------------------------------------


def photographs() -> list[bytes]:
    import skimage.data
    from PIL import Image

    images = []
    for array in (skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


async def wait_ready(client, process, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server was not ready after {timeout:.0f} s")
        try:
            if (await client.get("/readyz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.1)


async def load(client, images: list[bytes], count: int, concurrency: int, time_limit: float):
    """``count`` requests from ``concurrency`` clients (each sends its next one when answered);
    returns latencies (s), error descriptions, batch sizes seen by requests, wall time (s)."""
    latencies: list[float] = []
    errors: list[str] = []
    seen: list[int] = []
    issued = 0
    start = time.perf_counter()
    stop_at = start + time_limit

    async def worker() -> None:
        nonlocal issued
        while issued < count and time.perf_counter() < stop_at:
            body = images[issued % len(images)]
            issued += 1
            sent = time.perf_counter()
            try:
                response = await client.post(
                    "/v1/predict", content=body, headers={"content-type": "image/jpeg"}
                )
            except Exception as error:  # counted and reported, never fatal
                errors.append(
                    f"{type(error).__name__} after {time.perf_counter() - sent:.2f} s: {error!r}"
                )
                continue
            latencies.append(time.perf_counter() - sent)
            if response.status_code != 200:
                errors.append(f"HTTP {response.status_code}: {response.text[:120]}")
                continue
            seen.append(response.json()["predictions"][0]["batch_size"])

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors, seen, time.perf_counter() - start


HISTOGRAM = re.compile(r'^densenet_batch_size_bucket\{le="([^"]+)"\} (\S+)$', re.M)
TOTALS = re.compile(r"^densenet_batch_size_(sum|count) (\S+)$", re.M)
INFERENCE = re.compile(r"^densenet_inference_seconds_sum (\S+)$", re.M)


def batch_histogram(metrics: str) -> tuple[dict[str, int], float, float, float]:
    """Batch-size histogram buckets (cumulative), images, batches and model seconds so far."""
    buckets = {le: int(float(n)) for le, n in HISTOGRAM.findall(metrics)}
    totals = {k: float(v) for k, v in TOTALS.findall(metrics)}
    busy = INFERENCE.search(metrics)
    return (
        buckets,
        totals.get("sum", 0.0),
        totals.get("count", 0.0),
        float(busy.group(1)) if busy else 0.0,
    )


def summarize(mode: str, max_batch: int, max_wait_ms: float, rounds: list[dict]) -> dict:
    """One mode's figures over all its rounds."""
    latencies = sorted(t for r in rounds for t in r["latencies"])
    errors = [e for r in rounds for e in r["errors"]]
    seen = [b for r in rounds for b in r["seen"]]
    wall = sum(r["wall"] for r in rounds)
    buckets: Counter = Counter()
    for r in rounds:
        buckets.update(r["buckets"])
    batches = sum(r["batches"] for r in rounds)
    images = sum(r["images"] for r in rounds)
    return {
        "mode": mode,
        "max_batch": max_batch,
        "max_wait_ms": max_wait_ms,
        "requests": len(latencies),
        "errors": len(errors),
        "first_errors": errors[:5],
        "seconds": wall,
        "requests_per_s": len(latencies) / wall if wall else 0.0,
        "requests_per_s_by_round": [len(r["latencies"]) / r["wall"] for r in rounds],
        "p50_ms": 1000 * statistics.median(latencies) if latencies else None,
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        if latencies
        else None,
        "batches": batches,
        "mean_batch": images / batches if batches else None,
        "model_ms_per_image": 1000 * sum(r["model_s"] for r in rounds) / images if images else None,
        "batches_by_size_bucket": {le: n for le, n in buckets.items() if n},
        "largest_batch_seen": max(seen) if seen else None,
        "requests_by_batch_size": dict(sorted(Counter(seen).items())),
    }


async def one_round(client, images: list[bytes], args: argparse.Namespace, count: int) -> dict:
    """``count`` requests to one server, with the batches it ran meanwhile (from /metrics)."""
    before = batch_histogram((await client.get("/metrics")).text)
    latencies, errors, seen, wall = await load(
        client, images, count, args.concurrency, args.time_limit / args.rounds
    )
    after = batch_histogram((await client.get("/metrics")).text)
    buckets, previous = {}, 0
    for le, cumulative in after[0].items():
        count_le = cumulative - before[0].get(le, 0)
        buckets[le], previous = count_le - previous, count_le
    return {
        "latencies": latencies,
        "errors": errors,
        "seen": seen,
        "wall": wall,
        "buckets": buckets,
        "batches": int(after[2] - before[2]),
        "images": after[1] - before[1],
        "model_s": after[3] - before[3],
    }


async def measure(args: argparse.Namespace, modes: dict[str, Mode]) -> list[dict]:
    """Start one server per mode, then send each the same load in alternating rounds."""
    import httpx

    images = photographs()
    servers = {name: start_server(args, mode) for name, mode in modes.items()}
    # idle connections are dropped by the client (after 1 s) before the server's keep-alive timeout
    # (5 s) closes them: otherwise a request sent just as the server closes its connection fails
    limits = httpx.Limits(
        max_connections=args.concurrency,
        max_keepalive_connections=args.concurrency,
        keepalive_expiry=1.0,
    )
    clients = {
        mode: httpx.AsyncClient(base_url=url, timeout=60, limits=limits)
        for mode, (_, url) in servers.items()
    }
    rounds: dict[str, list[dict]] = {mode: [] for mode in modes}
    try:
        for mode, client in clients.items():
            await wait_ready(client, servers[mode][0])
            await load(client, images, 2 * args.concurrency, args.concurrency, 60)  # warm-up
        per_round = max(1, args.requests // args.rounds)
        for _ in range(args.rounds):
            for mode, client in clients.items():
                rounds[mode].append(await one_round(client, images, args, per_round))
    finally:
        for client in clients.values():
            await client.aclose()
        for process, _ in servers.values():
            process.terminate()
            process.wait(60)
    return [summarize(name, *modes[name][:2], rounds[name]) for name in modes]


# ---- --fairness: small requests beside maximal ones --------------------------------------------


def heavy_files(side: int, count: int) -> list[tuple]:
    """Multipart files of one maximal request: ``count`` uniform RGB PNGs of ``side`` x ``side``
    pixels (small to send, costly to decode)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (90, 120, 150)).save(buffer, "PNG")
    return [("file", (f"large-{i}.png", buffer.getvalue(), "image/png")) for i in range(count)]


async def flood(client, files: list[tuple], stop: asyncio.Event, answered: list[float]) -> None:
    """Send the maximal request back to back until ``stop``; latencies of those answered 200."""
    while not stop.is_set():
        sent = time.perf_counter()
        response = await client.post("/v1/predict", files=files)
        if response.status_code != 200:
            raise RuntimeError(f"a heavy request got {response.status_code}: {response.text[:200]}")
        answered.append(time.perf_counter() - sent)


def percentiles(latencies: list[float]) -> dict:
    ordered = sorted(latencies)
    return {
        "requests": len(ordered),
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
    }


async def fairness(args: argparse.Namespace) -> dict:
    """Small requests' latency on an idle server, then beside heavy clients (same server)."""
    import httpx

    images = photographs()
    process, url = start_server(args, Mode(args.max_batch, args.max_wait_ms))
    side = int((args.max_request_pixels / args.heavy_images) ** 0.5)  # filling the limit
    files = heavy_files(side, args.heavy_images)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            await wait_ready(client, process)
            await load(client, images, 2 * args.concurrency, args.concurrency, 60)  # warm-up
            idle, idle_errors, _, _ = await load(
                client, images, args.requests, args.concurrency, args.time_limit
            )
            stop, heavy = asyncio.Event(), []
            heavy_clients = [
                httpx.AsyncClient(base_url=url, timeout=300) for _ in range(args.heavy_clients)
            ]
            floods = [asyncio.create_task(flood(c, files, stop, heavy)) for c in heavy_clients]
            loaded, loaded_errors, _, wall = await load(
                client, images, args.requests, args.concurrency, args.time_limit
            )
            stop.set()
            await asyncio.gather(*floods)
            for c in heavy_clients:
                await c.aclose()
    finally:
        process.terminate()
        process.wait(60)
    idle_figures, loaded_figures = percentiles(idle), percentiles(loaded)
    return {
        "idle": idle_figures,
        "beside_heavy": loaded_figures,
        "p99_ratio": loaded_figures["p99_ms"] / idle_figures["p99_ms"],
        "errors": idle_errors + loaded_errors,
        "heavy_request": {
            "images": f"{args.heavy_images} PNGs of {side}x{side}",
            "pixels": args.heavy_images * side * side,
            "answered_during_small_load": len(heavy),
            "p50_ms": 1000 * statistics.median(heavy) if heavy else None,
            "seconds_of_small_load": wall,
        },
    }


def report_fairness(args: argparse.Namespace) -> int:
    """Run ``fairness``, print its figures (and write them with --json); 1 on errors."""
    load_before = os.getloadavg()[0]
    report = {
        "model": args.model,
        "concurrency": args.concurrency,
        "heavy_clients": args.heavy_clients,
        **asyncio.run(fairness(args)),
        "load_average_1min": [load_before, os.getloadavg()[0]],
    }
    if args.json:
        with open(args.json, "w") as file:
            json.dump(report, file, indent=2)
    heavy = report["heavy_request"]
    print(
        f"model {args.model}, {args.concurrency} clients sending small requests (one JPEG each); "
        f"{args.heavy_clients} heavy client(s): {heavy['images']} ({heavy['pixels']:,} pixels)"
    )
    print(f"{'small requests':<24} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for phase in ("idle", "beside_heavy"):
        r = report[phase]
        print(f"{phase:<24} {r['requests']:>8} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f}")
    p50 = f"{heavy['p50_ms']:.0f} ms" if heavy["p50_ms"] else "-"
    print(
        f"p99 beside heavy / idle: {report['p99_ratio']:.2f}x; heavy requests answered meanwhile: "
        f"{heavy['answered_during_small_load']} (p50 {p50})"
    )
    print(
        f"load average (1 min) before/after: {report['load_average_1min']}, {os.cpu_count()} CPUs"
    )
    if report["errors"]:
        print(f"errors: {report['errors'][:5]}")
    return 1 if report["errors"] else 0


# ---- --latency: one client's answer time against its parts --------------------------------------


async def answer_times(args: argparse.Namespace) -> tuple[list[float], dict[str, list[float]]]:
    """One client's answer times (s) from a server with the default batching, after a warm-up,
    and the server's own timing of each answer (ms: total, preprocess, queue, inference)."""
    import httpx

    images = photographs()
    process, url = start_server(args, Mode(args.max_batch, args.max_wait_ms))
    answers, timings = [], {}
    try:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            await wait_ready(client, process)
            for i in range(args.requests + 10):
                sent = time.perf_counter()
                response = await client.post(
                    "/v1/predict", content=images[i % len(images)],
                    headers={"content-type": "image/jpeg"},
                )  # fmt: skip
                answered = time.perf_counter() - sent
                response.raise_for_status()
                if i >= 10:  # after a warm-up
                    answers.append(answered)
                    for name, value in response.json()["timing"].items():
                        timings.setdefault(name, []).append(value)
    finally:
        process.terminate()
        process.wait(60)
    return answers, timings


def parts_of_an_answer(args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """Decoding and preprocessing one photograph, and the model at batch 1 (s each), as the
    server's ``Classifier`` runs them, measured in this process."""
    import torch

    import densenet
    from densenet.data.images import open_image

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    classifier = densenet.Classifier(densenet.DenseNet(**MODELS[args.model]), device=args.device)
    images, decode, model = photographs(), [], []
    for i in range(args.requests + 10):
        start = time.perf_counter()
        x = classifier.preprocess(open_image(images[i % len(images)]), "photograph")
        decoded = time.perf_counter()
        classifier.probabilities(x[None])
        if i >= 10:  # after a warm-up, as for the server
            decode.append(decoded - start)
            model.append(time.perf_counter() - decoded)
    return decode, model


def report_latency(args: argparse.Namespace) -> int:
    from densenet.infer.engines import cpu_flags, cpu_name

    answers, timings = asyncio.run(answer_times(args))
    decode, model = parts_of_an_answer(args)
    medians = [statistics.median(x) * 1e3 for x in (answers, decode, model)]
    report = {
        "model": args.model,
        "device": args.device,
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "torch_threads": args.threads,
        "requests": len(answers),
        "answer_ms_p50": medians[0],
        "decode_ms_p50": medians[1],
        "model_ms_p50": medians[2],
        "server_timing_ms_p50": {k: statistics.median(v) for k, v in timings.items()},
        "ratio": medians[0] / (medians[1] + medians[2]),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(report, file, indent=2)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.serve_port is not None:
        run_server(args)
        return 0
    if args.fairness:
        return report_fairness(args)
    if args.latency:
        return report_latency(args)
    import torch

    import densenet

    on_gpu = args.device.startswith("cuda")
    modes = {"dynamic batching": Mode(args.max_batch, args.max_wait_ms, buckets=on_gpu)}
    if on_gpu:
        modes["batching, no buckets"] = Mode(args.max_batch, args.max_wait_ms)
    modes["one at a time"] = Mode(1, 0.0)
    load_before = os.getloadavg()[0]
    results = asyncio.run(measure(args, modes))
    ratio = results[0]["requests_per_s"] / results[-1]["requests_per_s"]
    pairs = zip(results[0]["requests_per_s_by_round"], results[-1]["requests_per_s_by_round"])
    round_ratios = [a / b for a, b in pairs]
    report = {
        "model": args.model,
        "device": args.device,
        "config": MODELS[args.model],
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "torch_threads_in_server": args.threads,
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "torch": torch.__version__,
        "densenet": densenet.__version__,
        "results": results,
        "throughput_ratio": ratio,
        "throughput_ratio_by_round": round_ratios,
    }
    if args.json:
        with open(args.json, "w") as file:
            json.dump(report, file, indent=2)
    print(f"model {args.model} (random weights), {args.concurrency} concurrent clients, 127.0.0.1")
    for r in results:
        print(
            f"{r['mode']}: batches by size (histogram bucket: count) {r['batches_by_size_bucket']}"
        )
        rates = ", ".join(f"{x:.1f}" for x in r["requests_per_s_by_round"])
        print(f"  requests/s by round: {rates}")
        if r["first_errors"]:
            print(f"  first errors: {r['first_errors']}")
    header = (
        f"{'mode':<22} {'requests':>8} {'errors':>6} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'mean batch':>10} {'model ms/img':>12}"
    )
    print(header)
    for r in results:
        mean = f"{r['mean_batch']:.1f}" if r["mean_batch"] else "-"
        print(
            f"{r['mode']:<22} {r['requests']:>8} {r['errors']:>6} {r['requests_per_s']:>8.1f} "
            f"{r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {mean:>10} {r['model_ms_per_image']:>12.2f}"
        )
    if on_gpu:
        print(
            "buckets / no buckets, requests/s: "
            f"{results[0]['requests_per_s'] / results[1]['requests_per_s']:.2f}x"
        )
    print(
        f"dynamic batching / one at a time, requests/s: {ratio:.2f}x overall; by round: median "
        f"{statistics.median(round_ratios):.2f}x, range {min(round_ratios):.2f}-{max(round_ratios):.2f}x"
    )
    print(
        f"load average (1 min) before/after: {report['load_average_1min']}, {os.cpu_count()} CPUs"
    )
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
