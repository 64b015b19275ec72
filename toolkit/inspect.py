"""`edge-tdmpc inspect`: what a checkpoint holds."""
import os
import warnings
from collections import Counter

from edge_tdmpc.checkpoint import load_model, read_state_dict


def summarize(path, tasks=None) -> str:
    raw = read_state_dict(path)
    dtypes = Counter(str(v.dtype).replace("torch.", "") for v in raw.values() if hasattr(v, "dtype"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(path, tasks=tasks)
    cfg = model.cfg
    stored = sum(v.numel() for v in raw.values() if hasattr(v, "numel"))
    size = os.path.getsize(path)
    layout = "older (flat _Qs.params.N)" if "_Qs.params.0" in raw else "newer (_Qs.params.L.weight)"
    lines = [
        f"checkpoint     {path}",
        f"size preset    {cfg.size}M" if cfg.size else "size preset    custom",
        f"task set       {len(cfg.tasks)} tasks ({'mt30' if len(cfg.tasks) == 30 else ','.join(cfg.tasks)})",
        f"obs / action   {cfg.obs_dim} / {cfg.action_dim} (padded)",
        f"latent / mlp   {cfg.latent_dim} / {cfg.mlp_dim}, enc {cfg.enc_dim} x {cfg.num_enc_layers - 1}, "
        f"{cfg.num_q} Q heads",
        f"parameters     {model.total_params:,} trainable, {stored:,} stored elements",
        f"dtype          {', '.join(f'{k} ({n})' for k, n in dtypes.most_common())}",
        f"key layout     {layout}",
        f"bytes on disk  {size:,} ({size / 2**20:.2f} MiB)",
        "",
        f"{'module':<12}{'parameters':>12}",
    ]
    for name, child in model.named_children():
        n = sum(p.numel() for p in child.parameters())
        lines.append(f"{name:<12}{n:>12,}")
    return "\n".join(lines)
