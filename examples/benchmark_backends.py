"""CPU benchmark of the encoder backends: volumes/s per backend, as ratios to torch eager fp32.

All backends are measured in one process, in interleaved rounds (each round times every backend
once), and the median round is reported, so drift in machine load affects them alike.

    python examples/benchmark_backends.py [--model DIR] [--batch 4] [--size 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from engine.backends import available_backends, select
from engine.model import load_model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    parser.add_argument("--batch", type=int, default=4, help="volumes per forward call")
    parser.add_argument("--size", type=int, default=64, help="cubic volume side in voxels")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--seconds", type=float, default=1.0, help="minimum time per backend per round")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--cache-dir", default=None, help="engine cache (default: MRFM_CACHE_DIR or the user cache)")
    return parser.parse_args()


def time_backend(backend, x: torch.Tensor, min_seconds: float) -> float:
    """Volumes per second over at least ``min_seconds`` of back-to-back encode calls."""
    n, start = 0, time.perf_counter()
    while True:
        backend.encode(x)
        n += x.shape[0]
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return n / elapsed


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    x = torch.randn(args.batch, 1, args.size, args.size, args.size, generator=torch.Generator().manual_seed(0))
    kw = {"device": "cpu", "max_batch": args.batch, "cache_dir": args.cache_dir}
    configs = [("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"), ("onnxruntime", "fp16")]

    print(
        f"model {model.name} ({model.fingerprint[:19]}...), batch {args.batch} x {args.size}^3, "
        f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, torch {torch.__version__}"
    )
    for info in available_backends("cpu"):
        if not info["available"]:
            print(f"  skipped {info['name']}: {info['reason']}")

    backends = {}
    for name, precision in configs:
        start = time.perf_counter()
        try:
            backend, _ = select(name, model, precision=precision, **kw)
        except (RuntimeError, ValueError) as exc:
            print(f"  skipped {name} {precision}: {exc}")
            continue
        backend.encode(x)  # warm-up: first-call allocations, thread pools
        print(f"  ready {name} {precision} in {time.perf_counter() - start:.1f}s (cache hit: {backend.cache_hit})")
        backends[(name, precision)] = backend

    reference = backends[("torch", "fp32")].encode(x)
    rates: dict[tuple[str, str], list[float]] = {k: [] for k in backends}
    for _ in range(args.rounds):
        for key, backend in backends.items():
            rates[key].append(time_backend(backend, x, args.seconds))

    base = statistics.median(rates[("torch", "fp32")])
    print(f"\n{'backend':<14}{'precision':<11}{'volumes/s':>11}{'vs torch fp32':>15}{'max |diff| tokens':>20}")
    for key, backend in backends.items():
        feats = backend.encode(x)
        diff = max(float((f.tokens - r.tokens).abs().max()) for f, r in zip(feats, reference))
        rate = statistics.median(rates[key])
        print(f"{key[0]:<14}{key[1]:<11}{rate:>11.2f}{rate / base:>14.2f}x{diff:>20.2e}")


if __name__ == "__main__":
    main()
