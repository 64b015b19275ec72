"""What a training run leaves on disk: resumable training-state files and metric rows (JSONL, CSV, TensorBoard
or wandb)."""
import csv
import json
import re
from pathlib import Path

import torch

from edge_tdmpc.checkpoint import atomic_save

STATE_RE = re.compile(r"state-(\d+)\.pt")
LOGGERS = ("none", "tensorboard", "wandb")  # `external_logger`'s kinds (--logger)


class Checkpoints:
    """Training-state files `state-<step>.pt`, written atomically; the newest `keep` are kept so a corrupt or
    half-written last one falls back to the previous good one."""

    def __init__(self, root, keep: int = 2):
        self.root, self.keep = Path(root), keep

    def paths(self) -> list[Path]:
        found = [(int(m.group(1)), p) for p in self.root.glob("state-*.pt")
                 if (m := STATE_RE.fullmatch(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def save(self, state: dict, step: int):
        atomic_save(state, self.root / f"state-{step:09d}.pt")
        for old in self.paths()[self.keep:]:
            old.unlink(missing_ok=True)

    def latest(self, echo=print) -> dict | None:
        for path in self.paths():
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # truncated / corrupt: fall back to the previous file
                echo(f"warning: skipping unreadable checkpoint {path.name} ({str(e).splitlines()[0][:120]})")
        return None


def read_metrics(out) -> list[dict]:
    """The metric rows of the run in `out` (its metrics.jsonl; [] when there is none), a line cut by a kill
    left out."""
    return read_jsonl(Path(out) / "metrics.jsonl")


def read_jsonl(path) -> list[dict]:
    """The rows of a JSON-lines file ([] when there is none), a line cut by a kill left out."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class MetricsLog:
    """metrics.jsonl (every row) + metrics.csv (train rows) / <kind>.csv; a resume drops rows past its step."""

    def __init__(self, out, resume_step: int | None = None, external=None):
        self.out, self.external, self._fields = Path(out), external, {}
        self.jsonl = self.out / "metrics.jsonl"
        rows = []
        if resume_step is not None:
            rows = [row for row in read_metrics(self.out) if row.get("step", 0) <= resume_step]
        for name in ("metrics.jsonl", "metrics.csv", "eval.csv", "episode.csv"):
            (self.out / name).unlink(missing_ok=True)
        for row in rows:
            self.write(row, external=False)

    def write(self, row: dict, external=True):
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        kind = row.get("kind", "train")
        name = "metrics.csv" if kind == "train" else f"{kind}.csv"  # one CSV per row kind: fixed columns
        new = name not in self._fields
        if new:
            self._fields[name] = list(row)
        with open(self.out / name, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self._fields[name], extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)
        if external and self.external is not None:
            self.external(row)


def external_logger(kind: str | None, out: Path, config: dict):
    """Optional TensorBoard / wandb sink for metric rows; a clear error if the package is missing."""
    if not kind or kind == "none":
        return None
    if kind == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("--logger tensorboard needs the tensorboard package (pip install tensorboard)") \
                from None
        writer = SummaryWriter(str(out / "tensorboard"))

        def log(row):
            prefix = "eval/" if row.get("kind") == "eval" else "train/"
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    writer.add_scalar(prefix + k, v, row["step"])
            writer.flush()
        return log
    if kind == "wandb":
        try:
            import wandb
        except ImportError:
            raise ValueError("--logger wandb needs the wandb package: pip install wandb") from None
        wandb.init(project="edge-tdmpc", dir=str(out), config=config, resume="allow")
        return lambda row: wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
    raise ValueError(f"unknown logger {kind!r}: choose none, tensorboard or wandb")
