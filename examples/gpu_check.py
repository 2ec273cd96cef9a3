"""GPU check: torch eager fp32 vs bf16 vs torch-compile (and TensorRT where installed).

Measures encoder throughput (volumes/s, input already on the GPU), parity with eager fp32,
peak GPU memory and model FLOPs utilisation (FLOPs counted by ``torch.utils.flop_counter`` on
one eager forward; MFU against the chip's dense bf16 peak, ``--peak-tflops``), on the embedded
default model and on a ViT-B-sized encoder (embed 768, depth 12, heads 12, patch 16, random
weights), and prints ratios to eager fp32. Then the inference stage as the pipeline runs it on
the default model: host views copied through pinned memory, encoded, and every default head
predicting on the device, split into encode and heads time per volume.

    python examples/gpu_check.py [--vitb-size 128] [--iters 20] [--json results.json]

On a machine without CUDA it says so and exits with status 0 (``--allow-cpu`` runs a tiny
smoke version of the same measurements on the CPU instead).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from engine.backends import select
from engine.model import Model, build_encoder, load_model


def vit_b_model(size: int, patch: int = 16) -> Model:
    """A ViT-B-sized encoder with seeded random weights, wrapped as a Model."""
    default = load_model()
    card = json.loads(json.dumps(default.card))
    card.update(name="vit-b-check", joint_dim=512)
    card.pop("text", None)
    card["encoder"].update(
        patch_size=patch,
        embed_dim=768,
        depth=12,
        num_heads=12,
        feature_layers=[3, 7, 11],
        weights="encoder.safetensors",
    )
    card["preprocessing"]["input_size"] = [size, size, size]
    encoder = build_encoder(card)
    encoder.init_weights(torch.Generator().manual_seed(0))
    encoder.eval().requires_grad_(False)
    fingerprint = "sha256:" + hashlib.sha256(json.dumps(card, sort_keys=True).encode() + b"seed0").hexdigest()
    return Model(Path(tempfile.gettempdir()), card, encoder, fingerprint)


def throughput(backend: Any, x: torch.Tensor, warmup: int, iters: int) -> tuple[float, list]:
    """Volumes/s of ``backend.forward`` on a device-resident batch (median of timed calls)."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with torch.inference_mode():
        for _ in range(warmup):
            out = backend.forward(x)
        sync()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            out = backend.forward(x)
            sync()
            times.append(time.perf_counter() - start)
    return x.shape[0] / statistics.median(times), [o.float() for o in out]


def parity(out: list, ref: list) -> dict[str, float]:
    names = ("cls", "tokens", "layers", "joint")
    result = {f"max_abs_{n}": float((a - b).abs().max()) for n, a, b in zip(names, out, ref)}
    tokens, ref_tokens = out[1].flatten(0, 1), ref[1].flatten(0, 1)
    result["min_cosine_tokens"] = float(torch.nn.functional.cosine_similarity(tokens, ref_tokens, dim=-1).min())
    return result


# Dense bf16 tensor-core peaks (spec sheets, TFLOP/s) for the MFU column; --peak-tflops overrides.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0}


def forward_flops(model: Model, x: torch.Tensor) -> float:
    """FLOPs of one eager forward on one volume, as torch's flop counter sees them."""
    from torch.utils.flop_counter import FlopCounterMode

    backend, _ = select("torch", model, precision="fp32", device=x.device, max_batch=1)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        backend.forward(x[:1])
    return float(counter.get_total_flops())


def check_model(label: str, model: Model, batch: int, device: torch.device, args: argparse.Namespace) -> list[dict]:
    size = model.input_size
    x = torch.randn(batch, 1, *size, generator=torch.Generator().manual_seed(0)).to(device)
    flops = forward_flops(model, x)
    configs = [("torch", "fp32"), ("torch", "bf16")]
    if device.type == "cuda":
        configs += [("torch-compile", "fp32"), ("torch-compile", "bf16")]
        if not args.no_tensorrt:
            configs += [("tensorrt", "fp32"), ("tensorrt", "bf16"), ("tensorrt", "fp16")]
    rows, ref = [], None
    print(
        f"\n== {label}: embed {model.embed_dim}, depth {model.config.depth}, patch {model.patch_size}, "
        f"input {size}, grid {model.grid_for(size)}, batch {batch}, {flops / 1e9:.1f} GFLOP/volume"
    )
    for name, precision in configs:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        try:
            backend, _ = select(
                name, model, precision=precision, device=device, max_batch=batch, cache_dir=args.cache_dir
            )
            rate, out = throughput(backend, x, args.warmup, args.iters)
        except Exception as exc:  # report and go on: one failing path must not hide the others
            print(
                f"  {name:<14}{precision:<6} failed or unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            )
            continue
        setup = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
        if ref is None:
            ref, base = out, rate
        row = {
            "model": label,
            "backend": name,
            "precision": precision,
            "batch": batch,
            "volumes_per_s": rate,
            "ratio_vs_eager_fp32": rate / base,
            "peak_mib": peak,
            "setup_s": setup,
            "tflops": rate * flops / 1e12,
            "mfu_vs_bf16_peak": rate * flops / 1e12 / args.peak_tflops if args.peak_tflops else None,
            **parity(out, ref),
        }
        rows.append(row)
        print(
            f"  {name:<14}{precision:<6}{rate:>10.1f} vol/s {row['ratio_vs_eager_fp32']:>6.2f}x  "
            f"{row['tflops']:>7.1f} TFLOP/s"
            + (f" MFU {row['mfu_vs_bf16_peak']:>6.1%}" if args.peak_tflops else "")
            + f"  peak {peak:>8.0f} MiB  max|d tokens| {row['max_abs_tokens']:.2e}  min cos {row['min_cosine_tokens']:.5f}  "
            f"(setup {setup:.1f}s)"
        )
        del backend, out
    return rows


def stage_check(
    model: Model, device: torch.device, batch: int, backend_name: str, precision: str, args: argparse.Namespace
) -> dict:
    """The inference stage on the default model as the pipeline runs it: host views through
    pinned memory, encode (features back on the host), then every default head on the device."""
    from engine.features import HeadInput
    from engine.inference import load_heads

    backend, _ = select(
        backend_name, model, precision=precision, device=device, max_batch=batch, cache_dir=args.cache_dir
    )
    tower = model.text_tower()
    text = None
    if tower is not None:
        from engine.features import TextFeatures

        queries = ["left kidney", "liver lesion", "brain"]
        with torch.inference_mode():
            text = TextFeatures(queries, tower.encode(queries))
    heads, _ = load_heads(None, model, device, {}, text)
    images = torch.randn(batch, 1, *model.input_size, generator=torch.Generator().manual_seed(1))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    per_head: dict[str, list[float]] = {name: [] for name in heads}

    def once() -> tuple[float, float]:
        t0 = time.perf_counter()
        feats = backend.encode(images)
        sync()
        t1 = time.perf_counter()
        for name, head in heads.items():
            th = time.perf_counter()
            declared = head.spec["inputs"]
            inputs = [
                HeadInput(
                    f"s{i}",
                    images[i] if declared.get("image") else None,
                    f.only(declared["features"]),
                    text if "text" in declared["features"] else None,
                    tuple(model.input_size),
                    torch.ones_like(images[i], dtype=torch.bool),
                    None,
                )
                for i, f in enumerate(feats)
            ]
            with torch.inference_mode():
                head.predict(inputs)
            sync()
            per_head[name].append(time.perf_counter() - th)
        return t1 - t0, time.perf_counter() - t1

    for _ in range(args.warmup):
        once()
    times = [once() for _ in range(max(3, args.iters // 4))]
    encode, head_time = statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)
    row = {
        "model": "default",
        "stage": "inference",
        "backend": backend_name,
        "precision": precision,
        "batch": batch,
        "heads": sorted(heads),
        "encode_ms_per_volume": 1e3 * encode / batch,
        "heads_ms_per_volume": 1e3 * head_time / batch,
        "volumes_per_s": batch / (encode + head_time),
        "head_ms_per_volume": {n: 1e3 * statistics.median(t) / batch for n, t in per_head.items()},
    }
    print(
        f"\n== inference stage (default model, {backend_name} {precision}, batch {batch}, host input, "
        f"{len(heads)} heads: {', '.join(sorted(heads))})\n"
        f"  encode {row['encode_ms_per_volume']:.2f} ms/volume (incl. pinned H2D and features to host), "
        f"heads {row['heads_ms_per_volume']:.2f} ms/volume, {row['volumes_per_s']:.0f} volumes/s\n  per head (ms/volume): "
        + ", ".join(f"{n} {v:.2f}" for n, v in sorted(row["head_ms_per_volume"].items()))
    )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="batch for the default model")
    parser.add_argument("--vitb-batch", type=int, default=8)
    parser.add_argument("--vitb-size", type=int, default=128, help="cubic input side for the ViT-B config (96 or 128)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-tensorrt", action="store_true", help="skip TensorRT even where installed")
    parser.add_argument("--cache-dir", default=None, help="engine cache for TensorRT plans")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="dense bf16 peak of the chip for the MFU column (default: from the device name)",
    )
    parser.add_argument("--allow-cpu", action="store_true", help="smoke-run on the CPU with tiny sizes")
    args = parser.parse_args()

    if torch.cuda.is_available():
        device = torch.device("cuda")
        name = torch.cuda.get_device_name()
        print(
            f"{name} (sm {'.'.join(map(str, torch.cuda.get_device_capability()))}), torch {torch.__version__}, "
            f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}"
        )
        if args.peak_tflops is None:
            args.peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        if args.peak_tflops:
            print(f"MFU against a dense bf16 peak of {args.peak_tflops:g} TFLOP/s")
    elif args.allow_cpu:
        device = torch.device("cpu")
        args.batch, args.vitb_batch, args.vitb_size, args.iters, args.warmup = 2, 1, 32, 2, 1
        print("CPU smoke run (tiny sizes; torch-compile and TensorRT need CUDA)")
    else:
        print("CUDA is not available on this machine: nothing to measure (use --allow-cpu for a CPU smoke run).")
        return 0

    rows = check_model("default", load_model(), args.batch, device, args)
    rows += check_model("vit-b", vit_b_model(args.vitb_size), args.vitb_batch, device, args)
    default = load_model()
    for backend_name, precision in [("torch", "fp32"), ("torch", "bf16")]:
        try:
            rows.append(stage_check(default, device, args.batch, backend_name, precision, args))
        except Exception as exc:  # report and go on, as above
            print(f"\n== inference stage {backend_name} {precision} failed: {type(exc).__name__}: {exc}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
