"""Write every built-in head's initial weights.safetensors from a seed.

    python -m contrib_heads.init_weights [--seed 0] [--heads classify,segment]

Each head package exposes ``build_net()``, an ``nn.Module`` whose ``state_dict`` is exactly its
safetensors file, so a later fitting step can load, train and save the same module. Heads
without parameters (retrieve) have no weights file.
"""

from __future__ import annotations

import argparse
import importlib
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

HEADS = ("classify", "regress", "segment", "localize", "ground")


def head_seed(name: str, seed: int) -> int:
    """A per-head seed, so adding or reordering heads leaves the others' weights unchanged."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**31


def init_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The seeded initial state_dict of head ``name`` (the global RNG state is left untouched)."""
    module = importlib.import_module(f"contrib_heads.{name}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(head_seed(name, seed))
        net = module.build_net()
    return {key: value.detach().contiguous().clone() for key, value in net.state_dict().items()}


def weights_path(name: str) -> Path:
    """Where head ``name``'s manifest says its weights live."""
    module = importlib.import_module(f"contrib_heads.{name}")
    classes: list[type] = []
    module.register_heads(register=classes.append)
    (head_cls,) = classes
    path = head_cls.weights_path()
    if path is None:
        raise ValueError(f"head {name!r} declares no weights file")
    return path


def write_weights(name: str, seed: int = 0) -> Path:
    """Write head ``name``'s initial weights; return the file written.

    The metadata holds a single key: safetensors orders several keys differently from run to
    run, and the file should be byte-identical for the same seed.
    """
    path = weights_path(name)
    save_file(init_state(name, seed), str(path), metadata={"initial_seed": str(seed)})
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heads", default=",".join(HEADS), help="comma-separated head names")
    args = parser.parse_args(argv)
    for name in [n.strip() for n in args.heads.split(",") if n.strip()]:
        if name not in HEADS:
            parser.error(f"unknown head {name!r}; choose from {', '.join(HEADS)}")
        path = write_weights(name, args.seed)
        count = sum(t.numel() for t in init_state(name, args.seed).values())
        print(f"{name}: {count} parameters -> {path}")


if __name__ == "__main__":
    main()
