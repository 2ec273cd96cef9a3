"""Session-wide test settings."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_engine_cache(tmp_path_factory):
    """Compiled encoders built by tests go to a temporary cache, never the user's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MRFM_CACHE_DIR", str(tmp_path_factory.mktemp("mrfm-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def cli_workspace(tmp_path_factory):
    """A two-study demo archive and the basic bad inputs, written once per session."""
    from click.testing import CliRunner

    from engine.cli import cli
    from engine.synthetic.bad_inputs import BASIC_CASES, write_bad_inputs

    root = tmp_path_factory.mktemp("cli")
    made = CliRunner().invoke(cli, ["demo-archive", str(root / "archive"), "--studies", "2", "--seed", "5"])
    assert made.exit_code == 0, made.output
    write_bad_inputs(root / "bad", seed=5, cases=BASIC_CASES)
    return root


@pytest.fixture(scope="session")
def cli_store(cli_workspace):
    """One ``mrfm run`` over the workspace, as a user types it: (store path, click result).

    Tests that read the store share it; a test that writes to it works on a copy.
    """
    from click.testing import CliRunner

    from engine.cli import cli

    out = cli_workspace / "r.zarr"
    result = CliRunner().invoke(
        cli,
        [
            "run",
            str(cli_workspace / "archive" / "dicom"),
            str(cli_workspace / "bad"),
            "--out",
            str(out),
            "--heads",
            "classify,retrieve",
            "--backend",
            "torch",
            "--workers",
            "0",
            "--log-json",
        ],
    )
    return out, result
