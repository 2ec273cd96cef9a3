"""The head networks live once in engine.head_nets: the contrib heads and the fitted-head templates
build the same classes, and the shipped weights load into them key for key."""

import importlib

import pytest
import torch
from safetensors.torch import load_file

import engine

NETS = {"localize": "CentreNet", "ground": "CentreNet", "segment": "SegmentNet"}


@pytest.mark.parametrize("name", sorted(NETS))
def test_contrib_and_fitted_heads_share_one_net_class(name):
    shared = getattr(engine.head_nets, NETS[name])
    contrib = importlib.import_module(f"contrib_heads.{name}")
    fitted = importlib.import_module(f"engine.fitting.heads.{name}")
    assert getattr(contrib, NETS[name]) is shared and getattr(fitted, NETS[name]) is shared
    assert type(contrib.build_net()) is shared


@pytest.mark.parametrize("name", sorted(NETS))
def test_shipped_weights_load_into_the_shared_nets_key_for_key(name):
    contrib = importlib.import_module(f"contrib_heads.{name}")
    weights = load_file(f"{contrib.__path__[0]}/weights.safetensors")
    net = contrib.build_net()
    assert set(net.state_dict()) == set(weights)
    net.load_state_dict(weights, strict=True)


def test_segment_net_reads_layers_deep_to_shallow():
    torch.manual_seed(0)
    net = engine.head_nets.SegmentNet(16, classes=3, widths=(8, 4, 4)).eval()
    grids = [torch.randn(1, 16, 2, 2, 2) for _ in range(3)]
    image = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        out = net(grids, image)
        swapped = net([grids[2], grids[1], grids[0]], image)
    assert out.shape == (1, 3, 16, 16, 16)
    assert not torch.allclose(out, swapped)  # the order is meaningful, so a caller's order matters


@pytest.mark.parametrize("name", ["localize", "ground"])
def test_shipped_dense_heads_are_the_fit_template_unchanged(name):
    # the shipped module is what `mrfm fit` packages (a head may import only engine's public API,
    # so it cannot import the template): a change to one that misses the other fails here
    from pathlib import Path

    from engine.fitting.heads import template_path

    shipped = Path(importlib.import_module(f"contrib_heads.{name}").__file__)
    assert shipped.read_text() == template_path(name).read_text()
