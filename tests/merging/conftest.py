from pathlib import Path

import pytest

from cpt.testing import build_tiny_model


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """θ0: a tiny random Llama folder shared by a test module."""
    return Path(build_tiny_model(tmp_path_factory.mktemp("base") / "tiny", seed=2))
