"""``mrfm model import``: a model folder from a third-party 3D ViT checkpoint.

The folder holds ``model.json`` (valid against ``schemas/model.schema.json``), ``encoder.safetensors``
(the checkpoint mapped onto vit3d, see :mod:`engine.fitting.adapters`) and the embedded default
model's text tower and projection, copied. The checkpoint has no image-text projection, so
``image_proj`` is seeded random and the joint space is not aligned: retrieval and grounding need
heads (and a projection) fit on this encoder. Heads fit on another encoder are skipped by
``mrfm run --model`` because their fingerprint names that encoder.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from engine.errors import UsageError

from .adapters import FORMATS, convert


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, or of a torch checkpoint read with ``weights_only`` (no
    code runs); a nested ``state_dict``/``model`` entry is unwrapped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # heavy: loaded only by the code path that reads or writes that format

        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict", "network"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise UsageError(f"{path}: not a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def import_checkpoint(
    checkpoint: str | Path,
    fmt: str,
    out: str | Path,
    *,
    num_heads: int | None = None,
    spacing: float | None = None,
    feature_layers: list[int] | None = None,
    name: str | None = None,
    seed: int = 0,
    base_model: str | Path | None = None,
) -> str:
    """Write a model folder at ``out`` from ``checkpoint``; returns the model's fingerprint."""
    from safetensors.torch import save_file  # heavy: loaded only by the code path that reads or writes that format

    from engine.model import (
        DEFAULT_MODEL_DIR,
        build_encoder,
        load_encoder_weights,
        load_model,
        read_card,
    )  # fitting reaches the run path only when it runs, never at import

    if fmt not in FORMATS:
        raise UsageError(f"unknown checkpoint format {fmt!r}; choose from {', '.join(FORMATS)}")
    state = load_checkpoint(checkpoint)
    base_dir = Path(base_model) if base_model else DEFAULT_MODEL_DIR
    base = read_card(base_dir)
    # num_heads is not in the weights; a head width of 64 is the ViT convention
    probe_dim = next(
        (v.shape[0] for k, v in state.items() if k.endswith(("patch_embeddings.weight", "patch_embed.proj.weight"))),
        None,
    )
    heads = num_heads or (max(1, int(probe_dim) // 64) if probe_dim else 1)
    try:
        vit_state, enc, grid = convert(state, fmt, heads)
    except (KeyError, ValueError) as exc:
        raise UsageError(f"{checkpoint}: not a {fmt} checkpoint this adapter can map: {exc}") from None
    depth = enc["depth"]
    enc["feature_layers"] = feature_layers or sorted({max(0, depth // 4 - 1), max(0, depth // 2 - 1), depth - 1})
    card = copy.deepcopy(base)
    card.pop("distribution", None)  # the base encoder's statistics say nothing of this one: calibrate it anew
    card["name"] = name or Path(checkpoint).stem.replace(" ", "-")[:64] or "imported"
    card["version"] = "0.1.0"
    card["description"] = f"{fmt} checkpoint {Path(checkpoint).name} mapped onto vit3d; text tower from {base['name']}."
    card["encoder"] = enc
    prep = card["preprocessing"]
    prep["input_size"] = [g * enc["patch_size"] for g in grid]
    if spacing:
        prep["spacing"] = [float(spacing)] * 3
    card["training"] = {
        "status": "imported",
        "source": Path(checkpoint).name,
        "format": fmt,
        "note": "image_proj is seeded random and the text tower is copied, not aligned with this encoder.",
        "image_proj_seed": seed,
    }
    out = Path(out)
    if (out / "model.json").exists():
        raise UsageError(f"{out} already holds a model")
    out.mkdir(parents=True, exist_ok=True)
    encoder = build_encoder(card)
    gen = torch.Generator().manual_seed(seed)
    proj = encoder.image_proj
    torch.nn.init.trunc_normal_(proj.weight, std=0.02, a=-0.04, b=0.04, generator=gen)
    torch.nn.init.zeros_(proj.bias)
    full = {
        **{k: v.detach().float().contiguous() for k, v in vit_state.items()},
        "image_proj.weight": proj.weight.detach().contiguous(),
        "image_proj.bias": proj.bias.detach().contiguous(),
    }
    if set(full) != set(encoder.state_dict()):
        raise UsageError(f"mapped weights do not fit vit3d: {sorted(set(encoder.state_dict()) ^ set(full))[:5]}")
    save_file(full, str(out / enc["weights"]))
    if base.get("text"):
        shutil.copytree(base_dir / base["text"]["folder"], out / card["text"]["folder"], dirs_exist_ok=True)
        shutil.copyfile(base_dir / base["text"]["projection"], out / card["text"]["projection"])
    (out / "model.json").write_text(json.dumps(card, indent=2) + "\n")
    load_encoder_weights(build_encoder(read_card(out)), out / enc["weights"])  # strict check
    return load_model(out).fingerprint


def describe(card: dict[str, Any]) -> str:
    e = card["encoder"]
    return f"vit3d d={e['embed_dim']} depth={e['depth']} heads={e['num_heads']} patch={e['patch_size']} input={card['preprocessing']['input_size']}"
