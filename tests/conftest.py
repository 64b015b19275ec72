"""Shared fixtures: the real MT30 student from ../shared (skipped when absent) and a tiny random model."""
import os
from pathlib import Path

import pytest
import torch

# without a GPU, compile/kernels.py's Triton kernels run in Triton's interpreter: it must be on before anything
# (torch.compile's checks included) imports triton
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CHECKPOINTS = SHARED / "checkpoints"
PARITY = SHARED / "reference" / "parity"


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


def make_tiny_model(tasks="mt30", seed=0):
    """A small random multitask model with the real architecture (fast to run in tests)."""
    from edge_tdmpc import WorldModel, make_config
    torch.manual_seed(seed)
    cfg = make_config(tasks, size=None, enc_dim=32, mlp_dim=32, latent_dim=16, num_q=2,
                      task_dim=16 if tasks == "mt30" else 0)
    model = WorldModel(cfg).eval()
    # official init zeroes reward/Q output layers; give them values so outputs are not trivially 0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


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
