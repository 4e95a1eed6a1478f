from pathlib import Path

import pytest
import torch

from cpt.testing import build_tiny_model


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """θ0: a tiny random Llama folder shared by a test module."""
    return Path(build_tiny_model(tmp_path_factory.mktemp("base") / "tiny", seed=2))


@pytest.fixture
def one_thread():
    """Tiny matrices: intra-op threads only add synchronisation (and stall badly on a
    loaded machine), so run single-threaded and restore afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
