"""Shared fixtures: the real MT30 student from ../shared (skipped when absent), a tiny random model, the compile
tests' module-scoped model, cache and fp32 artifact."""
import os
from pathlib import Path

import pytest
import torch

# without a GPU, compile/kernels.py's Triton kernels run in Triton's interpreter: it must be on before anything
# (torch.compile's checks included) imports triton
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import CHECKPOINTS, PARITY, SMALL, make_tiny_model


@pytest.fixture(scope="session", autouse=True)
def private_compile_cache(tmp_path_factory):
    """No test reads or fills the user's compile cache (~/.cache/edge-tdmpc): one private cache per run."""
    patch = pytest.MonkeyPatch()
    patch.setenv("EDGE_TDMPC_CACHE", str(tmp_path_factory.mktemp("compile-cache")))
    yield
    patch.undo()


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path.name} from ../shared beside the repository (not present here)")
    return path


@pytest.fixture(scope="session")
def checkpoint_path() -> Path:
    return _need(CHECKPOINTS / "mt30-1M-distilled-fp16.pt")


@pytest.fixture(scope="session")
def parity_npz():
    import numpy as np
    return np.load(_need(PARITY / "official-seed1.npz"))


@pytest.fixture(scope="session")
def student(checkpoint_path):
    from edge_tdmpc import load_model
    return load_model(checkpoint_path)


@pytest.fixture
def tiny_model():
    return make_tiny_model()


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one torch thread avoids OpenMP spin-wait contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- compile tests (module-scoped: built once per test module that uses them) ------------------------------------
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private compile cache for this module (never the user's ~/.cache)."""
    old = os.environ.get("EDGE_TDMPC_CACHE")
    path = tmp_path_factory.mktemp("cache")
    os.environ["EDGE_TDMPC_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("EDGE_TDMPC_CACHE", None)
    else:
        os.environ["EDGE_TDMPC_CACHE"] = old


@pytest.fixture(scope="module")
def model():
    return make_tiny_model()


@pytest.fixture(scope="module")
def fp32_artifact(model, cache, tmp_path_factory):
    from edge_tdmpc.compile import artifact
    out = tmp_path_factory.mktemp("art") / "fp32"
    return artifact.compile_model(model, "fp32", SMALL, out=out, verify_episodes=2, verify_steps=3)
