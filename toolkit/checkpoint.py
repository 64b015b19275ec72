"""Checkpoint I/O for both official TD-MPC2 key layouts, fp16 and the paper's quantized files.

Layouts: older flat `_Qs.params.{n}` (n = 4*layer + slot) and newer `_Qs.params.{layer}.{weight|bias|ln.*}`
with `_detach_Qs_params.` / `_target_Qs_params.` copies and tensordict bookkeeping. Files are always read with
`torch.load(weights_only=True)`: a file that needs arbitrary unpickling is refused, never executed.
"""
import errno
import hashlib
import pickle
import re
import shutil
import warnings
from pathlib import Path

import torch

from edge_tdmpc.config import PRESETS, ModelConfig, make_config
from edge_tdmpc.files import atomic_write
from edge_tdmpc.model import WorldModel
from edge_tdmpc.tasks import TASK_SETS, resolve_tasks

_SLOTS = ("weight", "bias", "ln.weight", "ln.bias")
_BOOKKEEPING = ("__batch_size", "__device")


METADATA = "edge_tdmpc"  # our key beside the official 'model' in the files we write


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the problem and the fix."""


def read_state_dict(path) -> dict:
    """Safely read a checkpoint file -> flat state dict (tensors as stored)."""
    return read_checkpoint(path)[0]


def read_checkpoint(path) -> tuple[dict, dict]:
    """Safely read a checkpoint file -> (flat state dict as stored, our metadata: {} for official files)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):  # zip (torch.save) or a raw pickle
        raise CheckpointError(f"{path}: not a PyTorch checkpoint file (neither a torch.save zip nor a pickle)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed| Please|\n|$)", str(e))
        detail = m.group(1).strip() if m else "unsupported pickle content"
        raise CheckpointError(
            f"{path}: refused to unpickle (the file holds objects beyond tensors, which could run code; {detail}); "
            "re-save it as {'model': state_dict} with trusted code"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({str(e).splitlines()[0]})") from None
    ours = {}
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        ours = obj.get(METADATA) if isinstance(obj.get(METADATA), dict) else {}
        obj = obj["model"]
        if "sha256" in ours and tensors_sha256(obj) != ours["sha256"]:  # official files carry none: not checked
            raise CheckpointError(f"{path}: its weights do not match the checksum saved with them (a flipped bit or a "
                                  "damaged copy); copy the file again or use another checkpoint")
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a TD-MPC2 checkpoint (expected {{'model': state_dict}})")
    return obj, ours


def to_internal(sd: dict) -> dict:
    """Either official layout -> our module layout (`_Qs.params.L.*`, `_target_Qs.params.L.*`)."""
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor) or k.endswith(_BOOKKEEPING) or k.startswith("_detach_Qs"):
            continue  # detach-Q params duplicate _Qs; bookkeeping is tensordict's
        m = re.fullmatch(r"(_Qs|_target_Qs)\.params\.(\d+)", k)
        if m:  # older flat layout
            n = int(m.group(2))
            k = f"{m.group(1)}.params.{n // 4}.{_SLOTS[n % 4]}"
        elif k.startswith("_target_Qs_params."):
            k = "_target_Qs.params." + k[len("_target_Qs_params."):]
        out[k] = v
    return out


def to_official(sd: dict, num_q: int) -> dict:
    """Our layout -> the official newer layout, loadable by official TD-MPC2 code."""
    out = {}
    for k, v in sd.items():
        if k.startswith("_target_Qs."):
            out["_target_Qs_params." + k[len("_target_Qs.params."):]] = v
        else:
            out[k] = v
            if k.startswith("_Qs.params."):
                out["_detach_Qs_params." + k[len("_Qs.params."):]] = v
    for prefix in ("_Qs.params.", "_detach_Qs_params.", "_target_Qs_params."):
        out[prefix + "__batch_size"] = torch.Size([num_q])
        out[prefix + "__device"] = None
    return out


def dequantize(sd: dict) -> tuple[dict, bool]:
    """Quantized tensors (the paper's int8 files) -> float32; returns (state dict, had_quantized)."""
    had = False
    out = {}
    for k, v in sd.items():
        if v.is_quantized:
            had = True
            v = v.dequantize()
        out[k] = v
    return out, had


def infer_config(sd: dict, tasks="mt30", size=None) -> ModelConfig:
    """Read the architecture off the tensor shapes; match a size preset when `size` is None."""
    def shape(key):
        if key not in sd:
            raise CheckpointError(f"missing key '{key}': not a TD-MPC2 state-observation checkpoint")
        return tuple(sd[key].shape)

    enc = sorted({int(m.group(1)) for k in sd if (m := re.fullmatch(r"_encoder\.state\.(\d+)\.weight", k))})
    if not enc:
        raise CheckpointError("missing key '_encoder.state.0.weight': not a state-observation TD-MPC2 checkpoint")
    latent_dim, enc_dim = shape(f"_encoder.state.{enc[-1]}.weight")[0], shape("_encoder.state.0.weight")[0]
    mlp_dim = shape("_dynamics.0.weight")[0]
    num_q, num_bins = shape("_Qs.params.2.weight")[0], shape("_reward.2.weight")[0]
    n_tasks, task_dim = shape("_task_emb.weight") if "_task_emb.weight" in sd else (1, 0)
    obs_dim = shape("_encoder.state.0.weight")[1] - task_dim
    action_dim = shape("_dynamics.0.weight")[1] - latent_dim - task_dim
    arch = dict(enc_dim=enc_dim, mlp_dim=mlp_dim, latent_dim=latent_dim, num_enc_layers=len(enc), num_q=num_q)

    if isinstance(tasks, str) and tasks in TASK_SETS and len(TASK_SETS[tasks]) != n_tasks:
        hint = "a single-task checkpoint: pass tasks='<task name>'" if n_tasks == 1 else (
            f"a {n_tasks}-task checkpoint" + (" (mt80?)" if n_tasks == 80 else ""))
        raise CheckpointError(
            f"task-set mismatch: '_task_emb.weight' has {n_tasks} rows but tasks='{tasks}' has "
            f"{len(TASK_SETS[tasks])} tasks; this is {hint}"
        )
    if size is None:
        size = next((s for s, p in PRESETS.items() if p == arch), None)
        if size is None:  # e.g. the mt30-19M checkpoint (latent 512): keep the shapes, name the nearest preset
            size = next((s for s, p in PRESETS.items()
                         if {k: v for k, v in p.items() if k != "latent_dim"} == {
                             k: v for k, v in arch.items() if k != "latent_dim"}), None)
    try:
        cfg = make_config(tasks, size=size if size in PRESETS else None, num_bins=num_bins, task_dim=task_dim, **arch)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if (cfg.obs_dim, cfg.action_dim, len(cfg.tasks)) != (obs_dim, action_dim, n_tasks):
        raise CheckpointError(
            f"checkpoint is for obs_dim {obs_dim}, action_dim {action_dim}, {n_tasks} task(s), but tasks={tasks!r} "
            f"needs obs_dim {cfg.obs_dim}, action_dim {cfg.action_dim}, {len(cfg.tasks)} task(s)"
        )
    return cfg


def load_state_into(model: WorldModel, sd: dict):
    """Copy a (internal-layout) state dict into `model`, naming any missing/extra/mis-shaped key."""
    own = model.state_dict()
    sd = dict(sd)
    for k in ("log_std_min", "log_std_dif", "_action_masks"):  # derived from the config, absent in old files
        sd.setdefault(k, own[k]) if k in own else None
    if "_target_Qs.params.0.weight" not in sd:  # a file without target Qs: start them at the online Qs
        sd.update({"_target_Qs" + k[3:]: v for k, v in sd.items() if k.startswith("_Qs.")})
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    if missing:
        raise CheckpointError(f"missing key '{missing[0]}' ({len(missing)} missing): file does not match the model")
    if extra:
        raise CheckpointError(f"unexpected key '{extra[0]}' ({len(extra)} extra): file does not match the model")
    for k, v in own.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"shape mismatch for '{k}': file has {tuple(sd[k].shape)}, model expects {tuple(v.shape)}")
    model.load_state_dict({k: sd[k].to(own[k].dtype) for k in own})


def file_tasks(path) -> tuple[str, ...] | None:
    """The task set a checkpoint written here names in our metadata (official files name none)."""
    return _named_tasks(read_checkpoint(path)[1])


def _named_tasks(metadata: dict) -> tuple[str, ...] | None:
    return tuple(metadata["tasks"]) if metadata.get("tasks") else None


def load_model(path, tasks=None, size=None, dtype=torch.float32, device="cpu") -> WorldModel:
    """Load an official-format TD-MPC2 checkpoint (either layout, fp16/fp32/quantized) -> eval-mode WorldModel.

    tasks: the file's task set: by default the one it names (files written here do), else MT30. A file that
    names another task set than `tasks` is refused in one line."""
    raw, metadata = read_checkpoint(path)
    own = _named_tasks(metadata)
    if tasks is None:
        tasks = ",".join(own) if own else "mt30"
    elif own is not None:
        wanted = tuple(resolve_tasks(tasks)) if isinstance(tasks, str) else tuple(tasks)
        if wanted != own:
            raise CheckpointError(f"{Path(path).name} is a model of {len(own)} task(s) ({','.join(own[:4])}"
                                  f"{', ...' if len(own) > 4 else ''}), not of the {len(wanted)} asked for; load it "
                                  "without naming tasks, or name its own")
    sd = to_internal(raw)
    sd, quantized = dequantize(sd)
    if quantized:
        warnings.warn(
            f"{Path(path).name}: dequantizing the paper's int8 tensors (quantize_per_tensor with scale 1.0: most "
            "weights were rounded to 0, so this model is degraded; use edge-tdmpc compile --precision int8 for "
            "calibrated INT8)", stacklevel=2)
    bad = [k for k, v in sd.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{Path(path).name}: {len(bad)} weight tensor(s) hold NaN or Inf (first: {bad[0]}); the "
                         "model diverged or the file is damaged: use an earlier checkpoint")
    cfg = infer_config(sd, tasks, size)
    model = WorldModel(cfg)
    load_state_into(model, sd)
    return model.to(device=device, dtype=dtype).eval()


def save_model(model: WorldModel, path, dtype=None):
    """Write {'model': state_dict} in the official newer layout, atomically (tmp file + rename), with a checksum of
    the weights under our own key (the official loader reads 'model' alone); `read_state_dict` verifies it."""
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu()
          for k, v in model.state_dict().items()}
    official = to_official(sd, model.cfg.num_q)
    atomic_save({"model": official, METADATA: {"sha256": tensors_sha256(official), "tasks": list(model.cfg.tasks)}},
                path)


def tensors_sha256(sd: dict) -> str:
    """sha256 of a state dict's tensors as stored (names, dtypes, shapes, bytes): a file's content checksum, since
    torch.load does not check the zip's CRCs."""
    h = hashlib.sha256()
    for k in sorted(k for k, v in sd.items() if torch.is_tensor(v)):
        v = sd[k].detach().cpu().contiguous()
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)}".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weights_sha256(model: WorldModel) -> str:
    """sha256 of a model's weights (names, shapes, fp32 values): the identity of a model held in memory, whatever
    file or dtype it came from (compile cache keys, teacher label caches, in-memory bench runs)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        v = v.detach().cpu()
        h.update(f"{k}:{tuple(v.shape)}".encode())
        h.update((v.float() if v.is_floating_point() else v).contiguous().numpy().tobytes())
    return h.hexdigest()


def atomic_save(obj, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda f: torch.save(obj, f))
    except RuntimeError as e:  # torch's zip writer reports a failed write (a full disk) as a RuntimeError
        if "write" not in str(e):
            raise
        full = shutil.disk_usage(path.parent).free < 1 << 20
        raise OSError(errno.ENOSPC if full else errno.EIO, "could not write the file", str(path)) from None
