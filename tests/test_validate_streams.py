"""``mrfm validate`` walks a store node by node and reports every violation as it finds it: one
store damaged in several places lists each of them (exit 1), and the first is out before the
walk has reached the next series."""

from __future__ import annotations

import shutil

from click.testing import CliRunner

from engine.cli import cli
from engine.store import ResultStore
from engine.synthetic.bad_store import MASK, tamper, write_small_store
from engine.validate import iter_problems


def test_every_violation_of_a_store_damaged_in_several_places_is_listed(tmp_path):
    store = write_small_store(tmp_path / "clean.zarr")
    assert CliRunner().invoke(cli, ["validate", str(store)]).exit_code == 0
    bad = tmp_path / "bad.zarr"
    shutil.copytree(store, bad)
    for case in ("huge_mask_shape", "deep_json", "huge_index_embedding"):
        tamper(bad, case)
    result = CliRunner().invoke(cli, ["validate", str(bad)])
    assert result.exit_code == 1, result.output
    problems = list(iter_problems(bad))
    for node, why in (
        (MASK, "declares"),
        ("/series/s2/zarr.json", "nested deeper"),
        ("/index/embedding/zarr.json", "238 GiB"),
    ):
        assert any(node in p and why in p for p in problems), (node, problems)
    printed = " ".join(result.output.split())  # the terminal folds long lines
    assert all(" ".join(p.split()) in printed for p in problems) and f"{len(problems)} problem(s)" in printed


def test_validate_reports_each_problem_before_it_reads_the_next_series(tmp_path, monkeypatch):
    store = tamper(write_small_store(tmp_path / "r.zarr"), "huge_mask_shape")  # s1's mask
    tamper(store, "deep_json")  # s2's group
    walked: list[str] = []
    listed = ResultStore.iter_series

    def recording(self):
        for key, attrs in listed(self):
            walked.append(key)
            yield key, attrs

    monkeypatch.setattr(ResultStore, "iter_series", recording)
    problems = iter_problems(store)
    first = next(problems)
    assert MASK in first and walked == ["s1"], (first, walked)
    rest = list(problems)
    assert walked == ["s1", "s2"] and any("/series/s2/zarr.json" in p for p in rest), rest
