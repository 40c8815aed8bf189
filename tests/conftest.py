from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long tests, left out of `make test`")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real test data not found at {SHARED_DATA}: clone the project beside ../shared")
    return SHARED_DATA


@pytest.fixture
def one_torch_thread():
    """Two cores shared by several test processes: one intra-op thread avoids oversubscription."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random MagicLens saved as a checkpoint (seed 1); a test file may define its own."""
    import torch

    from magiclens.model.checkpoint import build_model, save_checkpoint

    torch.manual_seed(1)
    model, preprocess = build_model("tiny")
    path = tmp_path_factory.mktemp("tiny") / "checkpoint"
    save_checkpoint(path, model, preprocess, step=0)
    return path
