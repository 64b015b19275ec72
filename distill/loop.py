"""The training loop around `Trainer.update`: batches, metric rows, checkpoints and resume, periodic closed-loop
evaluation, and the data-parallel launch (torchrun)."""
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from edge_tdmpc.checkpoint import save_model
from edge_tdmpc.distill.runlog import Checkpoints, MetricsLog
from edge_tdmpc.distill.trainer import TrainConfig, Trainer
from edge_tdmpc.model import WorldModel
from edge_tdmpc.options import check_min, setting


@dataclass(frozen=True)
class LoopOptions:
    """What `edge-tdmpc distill` (`DistillOptions`) and `edge-tdmpc train` (`OnlineOptions`) share: the seed
    (of the student, the batches and the update's noise) and the periods of checkpoints, metric rows and the
    closed-loop evaluation."""
    seed: int = setting(TrainConfig.seed)
    save_every: int = setting(10_000, "checkpoint period (state + model file)")
    log_every: int = setting(100, "metrics row period (averaged)")
    eval_every: int = setting(0, "closed-loop eval period (0: never)")
    eval_steps: int = setting(100, "agent steps per eval episode")
    eval_episodes: int = setting(1, "episodes per task of each periodic eval")

    def __post_init__(self):
        check_min(self, 1, "save_every", "log_every", "eval_steps", "eval_episodes")
        check_min(self, 0, "eval_every")


def closed_loop_eval(model: WorldModel, tasks, episodes=1, steps=100, seed=0, mpc=False, **planner) -> dict:
    """Short closed-loop episodes of the official evaluation protocol (`rollout.evaluation_episode`: torch fp32
    runtime, eval-mode actions, seeds as `edge-tdmpc bench` draws them) -> {task: mean return}."""
    from edge_tdmpc.planner import PlannerConfig
    from edge_tdmpc.rollout import evaluation_episode
    from edge_tdmpc.runtime import TorchRuntime
    model.eval()
    rt = TorchRuntime(model, "fp32", PlannerConfig.make(mpc=mpc, **planner), seed=seed)
    out = {}
    for task in tasks:
        rets = [evaluation_episode(rt, model.cfg, task, seed, ep, steps, eval_mode=True)[0].ret
                for ep in range(episodes)]
        out[task] = float(np.mean(rets))
    rt.close()
    return out


def fit(trainer: Trainer, sampler, steps: int, out, save_every=10_000, log_every=100, eval_every=0,
        eval_fn=None, resume=False, logger=None, progress=True, echo=print, on_save=None, sampler_tag=0) -> dict:
    """Train to `steps` updates: log averaged metrics, eval, checkpoint (state + student.pt) every N steps.

    With `resume`, continues from the newest readable state in out/checkpoints, bit-for-bit. `sampler_tag` names
    the data the sampler draws from (a DAgger phase): a saved sampler state of other data is not restored, the
    sampler starts its own stream."""
    from tqdm import tqdm

    out = Path(out)
    ckpts = Checkpoints(out / "checkpoints")
    lead = trainer.rank == 0
    resume_step = None
    if ckpts.paths() and not resume:
        raise ValueError(f"{out} already holds a training run; pass --resume to continue it or pick a new "
                         "--out")
    if resume:
        state = ckpts.latest(echo if lead else (lambda *_: None))
        if state is not None:
            trainer.load_state_dict(state["trainer"])
            if state.get("sampler_tag", 0) == sampler_tag:
                sampler.load_state_dict(state["sampler"])
            torch.set_rng_state(state["torch_rng"])
            resume_step = trainer.step
            if lead:
                echo(f"resumed from step {trainer.step}")
    log = MetricsLog(out, resume_step, logger) if lead else None

    def save():
        if lead:
            state = {"trainer": trainer.state_dict(), "sampler": sampler.state_dict(),
                     "torch_rng": torch.get_rng_state(), "sampler_tag": sampler_tag}
            ckpts.save(state, trainer.step)
            save_model(trainer.model, out / "student.pt")
            if on_save is not None:
                on_save(trainer)
        if trainer.world_size > 1:
            dist.barrier()

    sums, n, t0, start = {}, 0, time.perf_counter(), trainer.step
    with tqdm(total=steps, initial=trainer.step, unit="upd", desc="train", disable=not (progress and lead),
              dynamic_ncols=True) as pbar:
        while trainer.step < steps:
            info = trainer.update(sampler.sample())
            for k, v in info.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
            pbar.update(1)
            step = trainer.step
            if step % log_every == 0 or step == steps:
                vec = torch.stack([sums[k] / n for k in sorted(sums)])
                if trainer.world_size > 1:  # losses are per-rank means: average them
                    dist.all_reduce(vec)
                    vec /= trainer.world_size
                dt = time.perf_counter() - t0
                row = {"kind": "train", "step": step, **dict(zip(sorted(sums), vec.tolist(), strict=True)),
                       "updates_per_s": n / dt if dt > 0 else float("nan")}
                if lead:
                    log.write(row)
                    loss = row.get("total_loss", row["pi_loss"])  # a frozen world model has no loss: the policy's
                    pbar.set_postfix(loss=f"{loss:.3f}", ups=f"{row['updates_per_s']:.1f}")
                sums, n, t0 = {}, 0, time.perf_counter()
            if eval_fn is not None and eval_every and step % eval_every == 0 and lead:
                returns = eval_fn(trainer.model)
                log.write({"kind": "eval", "step": step, **returns,
                           "mean_return": float(np.mean(list(returns.values())))})
                t0 = time.perf_counter()  # eval time is not training time
            if step % save_every == 0 or step == steps:
                save()
    if trainer.step == start and lead:  # resumed a finished run: still hand back the student
        save_model(trainer.model, out / "student.pt")
    return {"steps": trainer.step, "student": str(out / "student.pt")}


def init_distributed(device="cpu") -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment; initialises the process group (gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    return dist.get_rank(), world
