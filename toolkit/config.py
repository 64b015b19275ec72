"""World-model configuration and the official size presets."""
from dataclasses import dataclass, field

from edge_tdmpc.tasks import EPISODE_LENGTH, TASK_DIMS, discount, resolve_tasks

# model_size -> architecture overrides (TD-MPC2 paper, Appendix / official config)
PRESETS = {
    1: dict(enc_dim=256, mlp_dim=384, latent_dim=128, num_enc_layers=2, num_q=2),
    5: dict(enc_dim=256, mlp_dim=512, latent_dim=512, num_enc_layers=2, num_q=5),
    19: dict(enc_dim=1024, mlp_dim=1024, latent_dim=768, num_enc_layers=3, num_q=5),
    48: dict(enc_dim=1792, mlp_dim=1792, latent_dim=768, num_enc_layers=4, num_q=5),
    317: dict(enc_dim=4096, mlp_dim=4096, latent_dim=1376, num_enc_layers=5, num_q=8),
}


@dataclass(frozen=True)
class ModelConfig:
    tasks: tuple[str, ...] = field(default_factory=lambda: resolve_tasks("mt30"))
    obs_dim: int = 24          # padded observation dim (multitask) or the task's own
    action_dim: int = 6        # padded action dim (multitask) or the task's own
    action_dims: tuple[int, ...] = ()  # each task's real action dim (for action masks)
    episode_lengths: tuple[int, ...] = ()
    size: int | None = 1
    # architecture
    enc_dim: int = 256
    mlp_dim: int = 384
    latent_dim: int = 128
    num_enc_layers: int = 2
    num_q: int = 2
    task_dim: int = 96
    simnorm_dim: int = 8
    dropout: float = 0.01
    # two-hot regression in symlog space
    num_bins: int = 101
    vmin: float = -10.0
    vmax: float = 10.0
    # policy prior
    log_std_min: float = -10.0
    log_std_max: float = 2.0

    @property
    def multitask(self) -> bool:
        return len(self.tasks) > 1

    @property
    def discounts(self) -> tuple[float, ...]:
        """Each task's TD discount, from its episode length (TD-MPC2's heuristic)."""
        return tuple(discount(L) for L in self.episode_lengths) or (0.99,)

    @property
    def bin_size(self) -> float:
        return (self.vmax - self.vmin) / (self.num_bins - 1)


def make_config(tasks="mt30", size: int | None = 1, **overrides) -> ModelConfig:
    """Config for a task set (or single task) and size preset; overrides win over the preset."""
    tasks = resolve_tasks(tasks)
    if size is not None and size not in PRESETS:
        raise ValueError(f"unknown model size {size}: choose one of {sorted(PRESETS)}")
    dims = [TASK_DIMS[t] for t in tasks]
    multitask = len(tasks) > 1
    base = dict(
        tasks=tasks,
        obs_dim=max(d[0] for d in dims) if multitask else dims[0][0],
        action_dim=max(d[1] for d in dims) if multitask else dims[0][1],
        action_dims=tuple(d[1] for d in dims),
        episode_lengths=tuple(EPISODE_LENGTH for _ in tasks),
        size=size,
        task_dim=96 if multitask else 0,
    )
    base.update(PRESETS.get(size, {}))
    base.update(overrides)
    return ModelConfig(**base)
