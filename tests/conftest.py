"""Session-wide test settings."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_engine_cache(tmp_path_factory):
    """Compiled encoders built by tests go to a temporary cache, never the user's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MRFM_CACHE_DIR", str(tmp_path_factory.mktemp("mrfm-cache")))
    yield
    mp.undo()
