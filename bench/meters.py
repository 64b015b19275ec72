"""Meters: per-action latency, control-rate deadlines, peak memory, and the facts of the machine measured on."""
import os
import platform
import sys
from pathlib import Path

import numpy as np
import psutil

MIB = 2**20
_STATUS = Path("/proc/self/status")


def latency_stats(ms) -> dict:
    """trtexec-style summary of per-action latencies in milliseconds."""
    ms = np.asarray(ms, dtype=np.float64)
    if ms.size == 0:
        return {k: None for k in ("mean", "p50", "p90", "p99", "max")}
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"mean": float(ms.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99),
            "max": float(ms.max())}


def deadline_misses(ms, hz: float | None) -> dict | None:
    """Actions slower than the control period 1/hz: the ones a robot running at `hz` would miss."""
    if not hz:
        return None
    ms = np.asarray(ms, dtype=np.float64)
    budget = 1000.0 / hz
    n = int((ms > budget).sum())
    return {"hz": hz, "budget_ms": budget, "missed": n, "rate": n / max(ms.size, 1)}


class PeakRss:
    """Peak resident memory of this process over a window (one episode).

    psutil samples the RSS between actions; on Linux the kernel's high-water mark (VmHWM, reset through
    /proc/self/clear_refs) also catches the transient peak inside an action, which sampling would miss.
    """

    def __init__(self):
        self.proc = psutil.Process()
        self.peak = 0
        self._hwm = self._reset_hwm()
        self.sample()

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def sample(self):
        self.peak = max(self.peak, self.proc.memory_info().rss)

    def peak_bytes(self) -> int:
        self.sample()
        if self._hwm:
            for line in _STATUS.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak = max(self.peak, int(line.split()[1]) * 1024)
        return self.peak


def device_memory_reset(device) -> None:
    import torch
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)


def device_memory_peak_mib(device) -> float | None:
    """Peak bytes torch allocated on the GPU in the window (None on CPU; other allocators are not seen)."""
    import torch
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / MIB
    return None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # absent, or fails to import without its native libraries (tensorrt on CPU)
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """What a reader needs to reproduce or discount the numbers."""
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": _cpu_model(),
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "mujoco": _version("mujoco"),
        "onnxruntime": _version("onnxruntime"),
        "tensorrt": _version("tensorrt"),
        "cuda": torch.version.cuda if gpu else None,
        "gpu": gpu,
        "torch_threads_per_worker": 1,
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,  # at report time
    }
