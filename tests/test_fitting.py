"""engine.fitting: fit a head on cached frozen features, install it, evaluate, import checkpoints."""

from __future__ import annotations

import csv
import importlib
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from engine import plugins, schemas
from engine.fitting import cache as cache_mod
from engine.fitting import metrics as M
from engine.fitting.fitter import fit
from engine.fitting.labels import read_labels, split_by_study

SHAPE, SPACING = (32, 32, 20), 6.0


def _volume(side: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A tissue ellipsoid with a bright sphere on the patient's right (side=1) or left (side=0)."""
    rng = np.random.default_rng(seed)
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    affine[:3, 3] = -SPACING * (np.asarray(SHAPE) - 1) / 2
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    body = ((xyz / [80, 80, 50]) ** 2).sum(-1) <= 1
    centre = np.array([40.0 if side else -40.0, rng.uniform(-15, 15), rng.uniform(-10, 10)])
    bright = ((xyz - centre) ** 2).sum(-1) <= rng.uniform(18, 26) ** 2
    data = 100 * body + 200 * bright + rng.normal(0, 5, SHAPE)
    return data.astype(np.float32), affine


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """16 NIfTI series in 8 studies, labelled by the side of their bright sphere (pooled features
    keep little of where things are, so a random encoder is near chance)."""
    root = tmp_path_factory.mktemp("labelled")
    (root / "images").mkdir()
    rows = []
    for i in range(16):
        side = i % 2
        data, affine = _volume(side, i)
        path = root / "images" / f"s{i:02d}.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), str(path))
        rows.append({"path": f"images/{path.name}", "study_uid": f"study{i // 2}", "side": "right" if side else "left"})
    with open(root / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_the_run_path_imports_no_fitting_code():
    code = "import sys, engine.pipeline, engine.inference, engine.cli; print([m for m in sys.modules if m.startswith('engine.fitting')])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_labels_and_split(labelled):
    labels = read_labels(labelled / "labels.csv", "classify")
    assert labels.targets == ["side"] and len(labels.series) == 16
    assert labels.series[0].path == (labelled / "images" / "s00.nii.gz").resolve()
    val = split_by_study([s.study_uid for s in labels.series], 0.25, seed=0)
    assert len(val) == 2 and val <= {f"study{i}" for i in range(8)}


def test_localize_threshold_is_the_best_recall_within_the_false_box_budget():
    from engine.fitting.detection_training import choose_threshold

    truth = np.array([[0, 0, 0, 10, 10, 10.0]])
    hit, miss = np.array([[1, 1, 1, 10, 10, 10.0]]), np.array([[50, 50, 50, 60, 60, 60.0]])
    # two series with a lesion: found at 0.8 and 0.3, each with a false box at 0.6 and 0.5; a clean series with a box at 0.2
    preds = [
        (np.concatenate([hit, miss]), np.array([0.8, 0.6])),
        (np.concatenate([hit, miss]), np.array([0.3, 0.5])),
        (miss, np.array([0.2])),
    ]
    threshold, mets = choose_threshold(preds, [truth, truth, np.zeros((0, 6))])
    assert threshold == 0.25  # recall 1 with 4/3 false boxes at 0.2 breaks the budget; 0.25 keeps recall 1, 2/3 false
    assert mets["recall@0.3"] == 1.0 and mets["false_boxes_per_series"] == pytest.approx(2 / 3, abs=1e-4)
    assert mets["clean_fraction"] == 1.0


def test_metrics():
    assert M.auroc_binary(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert M.random_recall_at(10, [1], 5) == pytest.approx(0.5)
    assert M.box_iou(np.array([0, 0, 0, 2, 2, 2]), np.array([1, 0, 0, 3, 2, 2]))[0, 0] == pytest.approx(1 / 3)


def test_fit_a_classifier_beats_the_floor_reuses_features_and_runs_as_a_head(labelled, tmp_path, monkeypatch):
    from engine.model import VisionTransformer3D

    calls = {"n": 0}
    forward = VisionTransformer3D.forward

    def counted(self, x):
        calls["n"] += 1
        return forward(self, x)

    monkeypatch.setattr(VisionTransformer3D, "forward", counted)
    cache = tmp_path / "cache"
    result = fit(
        "classify",
        labelled / "labels.csv",
        tmp_path / "side-head",
        archive=labelled / "images",
        cache_dir=cache,
        name="side",
        val_fraction=0.5,
        steps=100,
    )
    assert calls["n"] > 0 and result.encoded == 2 * 16  # trained and random encoder, once each
    acc = result.metrics["side"]["accuracy"]
    floor = result.floor["side"]["accuracy"]
    assert acc >= floor + 0.25, (acc, floor)

    manifest = json.loads((result.package / "manifest.json").read_text())
    schemas.validate("head", manifest, "fitted manifest")
    assert manifest["encoder"]["fingerprint"].startswith("sha256:")
    assert manifest["fit"]["metrics"]["side"]["accuracy"] == acc
    # temperature scaling fit on the validation studies, stored where the head applies it
    temp = manifest["fit"]["config"]["outputs"][0]["temperature"]
    assert temp > 0 and manifest["fit"]["metrics"]["side"]["temperature"] == temp
    assert (
        manifest["fit"]["metrics"]["side"]["ece"] is not None
        and manifest["fit"]["metrics"]["side"]["ece_uncalibrated"] is not None
    )
    # a published head names its labels, never a path of the machine that fit it
    assert manifest["fit"]["data"]["labels"] == "labels.csv" and str(labelled) not in json.dumps(manifest)
    assert "mrfm" in (tmp_path / "side-head" / "pyproject.toml").read_text()

    # a refit reads every feature from the store: the encoder is never called
    calls["n"] = 0
    again = fit(
        "classify",
        labelled / "labels.csv",
        None,
        archive=labelled / "images",
        cache_dir=cache,
        val_fraction=0.5,
        steps=20,
        floor=False,
    )
    assert calls["n"] == 0 and again.encoded == 0

    # the package, put on sys.path and registered, runs through the engine's real path
    import engine.testing as kit

    monkeypatch.syspath_prepend(str(tmp_path / "side-head"))
    module = importlib.import_module("mrfm_head_side")
    (head_cls,) = kit.heads_of(module)
    right = kit.run_head(head_cls, str(labelled / "images" / "s01.nii.gz"))
    left = kit.run_head(head_cls, str(labelled / "images" / "s00.nii.gz"))
    labels = manifest["outputs"][0]["labels"]
    assert (
        set(labels) == {"left", "right"} and right["side"].shape == (2,) and abs(float(left["side"].sum()) - 1) < 1e-5
    )


def test_feature_cache_keys_by_model(tmp_path):
    from engine.model import load_model

    model = load_model()
    rand = cache_mod.random_encoder_model(model, seed=0)
    assert rand.fingerprint != model.fingerprint
    assert cache_mod.model_key(rand.fingerprint) != cache_mod.model_key(model.fingerprint)


def test_evaluate_scores_a_store(tmp_path):
    """Score the shipped classify and retrieve heads on a small synthetic archive."""
    from engine.fitting.evaluation import evaluate, to_markdown
    from engine.synthetic import write_demo_archive

    write_demo_archive(tmp_path / "arch", studies=2, seed=5, formats=("explicit",))
    result = evaluate(tmp_path / "arch", heads=["classify", "retrieve"])
    rows = {(r["head"], r["metric"]): r for r in result["rows"]}
    assert {
        ("classify", "region accuracy"),
        ("classify", "contrast AUROC"),
        ("retrieve", "report->scan recall@1"),
    } <= set(rows)
    assert all(set(r) == {"head", "kind", "metric", "value", "floor", "n", "note"} for r in result["rows"])
    assert rows[("classify", "region accuracy")]["value"] >= 0.5
    assert "| classify | classification | region accuracy |" in to_markdown(result)
    # calibration beside accuracy: ECE from the reliability table, which sums to the series scored
    ece = rows[("classify", "region ECE")]
    table = result["reliability"]["classify region"]
    assert sum(b["n"] for b in table) == ece["n"] == rows[("classify", "region accuracy")]["n"]
    assert ece["value"] == pytest.approx(
        sum(b["n"] * abs(b["accuracy"] - b["confidence"]) for b in table) / ece["n"], abs=1e-4
    )
    assert "Reliability, classify region" in to_markdown(result)
    assert rows[("model", "not flagged")]["n"] == result["series"]  # the shipped default carries statistics


def _monai_vit(classification: bool = True):
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    vit = nets.ViT(
        in_channels=1,
        img_size=(32, 32, 32),
        patch_size=(8, 8, 8),
        hidden_size=64,
        mlp_dim=128,
        num_layers=2,
        num_heads=4,
        classification=classification,
        qkv_bias=True,
    ).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_(0, 0.2)  # far from the init, so a wrong mapping shows
    return vit


def test_monai_vit_parity(tmp_path):
    from safetensors.torch import save_file

    from engine.fitting.importing import import_checkpoint
    from engine.model import load_model

    vit = _monai_vit()
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    import_checkpoint(tmp_path / "vit.safetensors", "monai-vit", tmp_path / "model", num_heads=4, spacing=6.0)
    model = load_model(tmp_path / "model")
    x = torch.randn(2, 1, 32, 32, 32)
    seen = {}
    hook = vit.norm.register_forward_hook(lambda mod, i, o: seen.setdefault("x", o))
    with torch.no_grad():
        vit(x)
        cls, tokens, _, _ = model.encoder(x)
    hook.remove()
    ref = seen["x"]
    assert (ref[:, 0] - cls).abs().max().item() <= 1e-4
    assert (ref[:, 1:] - tokens).abs().max().item() <= 1e-4


def test_monai_vit_without_cls_is_refused(tmp_path):
    from safetensors.torch import save_file

    from engine.errors import UsageError
    from engine.fitting.importing import import_checkpoint

    vit = _monai_vit(classification=False)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    with pytest.raises(UsageError, match="CLS"):
        import_checkpoint(tmp_path / "vit.safetensors", "monai-vit", tmp_path / "model", num_heads=4)


def test_timm_names_map_like_monai(tmp_path):
    """The same weights under timm names give the same vit3d state."""
    from engine.fitting.adapters import from_monai_vit, from_timm_vit3d

    vit = _monai_vit()
    m = vit.state_dict()
    t = {
        "patch_embed.proj.weight": m["patch_embedding.patch_embeddings.weight"],
        "patch_embed.proj.bias": m["patch_embedding.patch_embeddings.bias"],
        "cls_token": m["cls_token"],
        "pos_embed": torch.cat([torch.zeros(1, 1, 64), m["patch_embedding.position_embeddings"]], 1),
        "norm.weight": m["norm.weight"],
        "norm.bias": m["norm.bias"],
    }
    for i in range(2):
        b = f"blocks.{i}."
        for a, c in (
            ("norm1", "norm1"),
            ("norm2", "norm2"),
            ("attn.qkv", "attn.qkv"),
            ("attn.proj", "attn.out_proj"),
            ("mlp.fc1", "mlp.linear1"),
            ("mlp.fc2", "mlp.linear2"),
        ):
            t[b + a + ".weight"], t[b + a + ".bias"] = m[b + c + ".weight"], m[b + c + ".bias"]
    s1, e1, g1 = from_monai_vit(dict(m), 4)
    s2, e2, g2 = from_timm_vit3d({"module." + k: v for k, v in t.items()}, 4)
    assert g1 == g2 == (4, 4, 4) and set(s1) == set(s2)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_imported_model_runs_a_head_fit_on_it(labelled, tmp_path, monkeypatch):
    """model import -> fit on the imported encoder -> mrfm run --model: the fitted head runs,
    heads fit on the default encoder are skipped."""
    from safetensors.torch import save_file

    from engine.fitting.importing import import_checkpoint
    from engine.pipeline import run
    from engine.store import open_store

    vit = _monai_vit()
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    import_checkpoint(tmp_path / "vit.safetensors", "monai-vit", tmp_path / "model", num_heads=4, spacing=6.0)
    card = json.loads((tmp_path / "model" / "model.json").read_text())
    schemas.validate("model", card, "imported card")
    assert (tmp_path / "model" / "text" / "model.safetensors").is_file()
    result = fit(
        "classify",
        labelled / "labels.csv",
        tmp_path / "imp-side",
        archive=labelled / "images",
        model=tmp_path / "model",
        cache_dir=tmp_path / "cache",
        name="imp-side",
        steps=30,
        floor=False,
    )
    monkeypatch.syspath_prepend(str(tmp_path / "imp-side"))
    module = importlib.import_module("mrfm_head_imp_side")
    plugins.pm.register(module, name="imp-side-test")
    try:
        summary = run(
            [labelled / "images" / "s00.nii.gz"],
            tmp_path / "r.zarr",
            heads=["imp-side"],
            model=tmp_path / "model",
            backend="torch",
            workers=0,
        )
        store = open_store(tmp_path / "r.zarr")
        ((key, attrs),) = list(store.iter_series())
        assert attrs["status"] == "complete" and "imp-side" in attrs["heads"]
        assert store.read_output(key, "imp-side", "side").shape == (2,)
        assert result.manifest["encoder"]["fingerprint"] == store.root.attrs["model"]["fingerprint"]
    finally:
        plugins.pm.unregister(module)
    del summary


def test_targets_pick_columns_of_a_synthetic_archive(tmp_path):
    from engine.errors import UsageError
    from engine.fitting.labels import read_labels
    from engine.synthetic import write_demo_archive

    write_demo_archive(tmp_path / "arch", studies=1, seed=5, formats=("explicit",))
    region = read_labels(tmp_path / "arch", "classify", ["region"])
    assert region.targets == ["region"] and all(set(s.values) == {"region"} for s in region.series)
    assert read_labels(tmp_path / "arch", "classify").targets == ["region", "contrast"]
    assert str(tmp_path) not in region.source and "seed 5" in region.source
    with pytest.raises(UsageError, match="no target.*'age'"):
        read_labels(tmp_path / "arch", "classify", ["age"])


def test_a_fit_waits_for_features_another_fit_is_writing_and_reuses_them(labelled, tmp_path):
    import threading

    from engine.discover import scan
    from engine.model import load_model

    model = load_model()
    (ref,) = [r for r in scan([labelled / "images" / "s00.nii.gz"]).series]
    first, second = cache_mod.FeatureCache(model, tmp_path), cache_mod.FeatureCache(model, tmp_path)
    key = cache_mod.series_key(ref)
    got = {}
    with first.lock(key):  # the first fit is encoding this series
        waiter = threading.Thread(target=lambda: got.setdefault("f", second.get(ref)))
        waiter.start()
        waiter.join(timeout=1.0)
        assert waiter.is_alive(), "the second fit must wait for the first one's features"
        first._write(key, first._compute(ref, tiles=False))
    waiter.join(timeout=60)
    assert second.encoded == 0 and first.encoded == 1  # encoded once, read by both
    np.testing.assert_array_equal(got["f"].cls, first._read(key, False).cls)


def test_the_fit_hint_installs_the_package_by_its_path(tmp_path, monkeypatch):
    """'pip install region-head' would ask the package index; the hint names the folder."""
    import shlex
    from types import SimpleNamespace

    from click.testing import CliRunner

    from engine.fitting import fitter
    from engine.fitting.cli import fit_command

    package = tmp_path / "my heads" / "region-head" / "region_head"
    fake = SimpleNamespace(
        name="region",
        package=package,
        encoded=0,
        seconds={"features": 0.0, "fit": 0.0},
        metrics={"accuracy": 1.0},
        floor=None,
        manifest={"fit": {"data": {"validation_series": 1}}},
    )
    monkeypatch.setattr(fitter, "fit", lambda *a, **k: fake)
    (tmp_path / "my heads").mkdir()
    monkeypatch.chdir(tmp_path / "my heads")  # --out relative, in a folder whose name needs quoting
    res = CliRunner().invoke(fit_command, ["classify", "--data", str(tmp_path), "--out", "region-head"])
    assert res.exit_code == 0, res.output
    line = next(line for line in res.output.splitlines() if "pip install" in line)
    target = shlex.split(line.split("pip install", 1)[1])
    assert target == [str(package.parent.resolve())]


def test_focal_loss_is_weighted_cross_entropy_at_gamma_zero_and_discounts_easy_voxels():
    import torch.nn.functional as F

    from engine.fitting.trainers import focal_loss

    torch.manual_seed(0)
    logits, target, weight = (
        torch.randn(2, 5, 4, 4, 4),
        torch.randint(0, 5, (2, 4, 4, 4)),
        torch.tensor([1.0, 2, 1, 1, 5]),
    )
    assert focal_loss(logits, target, weight, 0.0).item() == pytest.approx(
        F.cross_entropy(logits, target, weight=weight).item(), rel=1e-5
    )
    easy = torch.zeros(1, 2, 1, 1, 2)
    easy[0, 0, 0, 0, 0], easy[0, 1, 0, 0, 1] = 6.0, -1.0  # voxel 0 confidently right, voxel 1 unsure
    per = [
        focal_loss(easy[..., i : i + 1], torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.ones(2)).item()
        for i in range(2)
    ]
    ce = [F.cross_entropy(easy[..., i : i + 1], torch.zeros(1, 1, 1, 1, dtype=torch.long)).item() for i in range(2)]
    assert per[0] / ce[0] < 1e-4 < per[1] / ce[1]
