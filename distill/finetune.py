"""`edge-tdmpc finetune`: teach a trained multi-task model one more task, online.

The new task gets an embedding row of its own (`tasksets.add_task`), started from an existing task's: the one
--init-from names, or (auto) the one a measurement right before the first update, before any weight moves,
ranks first: by default the task under whose embedding the model's world-model loss on the seed phase's random
episodes of the new task is lowest (`tasksets.most_similar_task`); with --start-by return, the task whose row
makes the model's prior act best on the new task (`returns_by_row`: a few episodes per row), since a row that
fits the dynamics need not be the one whose policy already does the job. Then the official online schedule of
`edge-tdmpc train` runs on the new task alone. With --replay DATA (episodes of the model's old tasks: the data it
was distilled on, say) every batch also draws --replay-ratio of its slices from DATA, so the update keeps fitting
the old tasks while it learns the new one; with --replay-labels the prior also keeps learning the teacher
planner's actions on them (the planner term of `--distill planner`, on the replayed rows), since TD-MPC2's own
objective alone pulls a distilled prior away from its planner (docs/results/distill-mt30.md). With --anchor-coef C
the prior is also held to itself as the run starts (the `policy` distillation term, the start model its teacher,
on every state of the batch): started from a trained model, that objective first unlearns the prior on the new
task too, a good borrowed start included, and on the replayed rows the same term keeps the old tasks' prior
(docs/results/domain-students.md). With --self-label-every K the model's own planner labels every K-th state
its prior acts in on the new task (MPPI on the live weights, keeping its warm start at K 1: self-distillation, as
in BMPC), and the planner term teaches the prior those labels: where the model plans better than its prior acts,
the prior can learn toward its planner, which the anchor (a hold) cannot. With --trainable embedding only the
new task's embedding row learns (the world model's and the policy's losses reach it through the fixed network):
every old task's outputs stay bit for bit what they were, at the price of what one embedding row (task_dim
numbers) can express about a task. Out comes an ordinary checkpoint in the official layout with one more task.
"""
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch

from edge_tdmpc.checkpoint import load_model, save_model
from edge_tdmpc.distill.data import Batch, EpisodeDataset
from edge_tdmpc.distill.losses import PLANNER_FILTERS, split_plan_label
from edge_tdmpc.distill.online import Replay, ScheduleOptions, run_online
from edge_tdmpc.distill.sampler import SliceSampler
from edge_tdmpc.distill.teacher import Teacher, fit_dim, write_json
from edge_tdmpc.distill.trainer import TrainConfig, Trainer
from edge_tdmpc.files import file_sha256
from edge_tdmpc.options import check_min, setting, split_settings
from edge_tdmpc.seeding import derive_seed
from edge_tdmpc.tasks import check_task_subset
from edge_tdmpc.tasksets import add_task, most_similar_task

AUTO = "auto"
TRAINABLE = ("all", "embedding")
START_BY = ("loss", "return")
CHOICE = "new_task.json"  # out/: the new task, the task its embedding started from, and the ranking behind it


@dataclass(frozen=True)
class FinetuneOptions(ScheduleOptions):
    """The settings of `edge-tdmpc finetune` and `finetune()`: the online schedule, where the new task's
    embedding starts, and the old tasks' replay."""
    init_from: str = setting(AUTO, "existing task whose embedding the new task's starts from; auto: the one "
                             "--start-by measures best")
    start_by: str = setting("loss", "auto's measurement: loss (the world-model loss on the seed phase's random "
                            "episodes, lowest) or return (the prior's return on the new task under each row, highest, "
                            "played before the run starts; loss breaks ties)", choices=START_BY)
    start_episodes: int = setting(10, "episodes of the new task per row that --start-by return plays (on a chaotic "
                                  "task one episode a row ranks noise)")
    replay: str | None = setting(None, "dataset of the model's old tasks mixed into every batch (against "
                                 "forgetting)", type=str)
    replay_ratio: float = setting(0.5, "share of each batch drawn from --replay")
    replay_labels: bool = setting(False, "also teach the prior the planner labels --replay carries (the planner "
                                  "term on its rows)")
    planner_coef: float = setting(10.0, "weight of that planner term")
    planner_filter: str = setting(TrainConfig.planner_filter, "q: teach a state's label only where the model's Q "
                                  "values the planner's mean above the prior's action (none: every state)",
                                  choices=PLANNER_FILTERS)
    pi_warmup: int = setting(0, "updates in which only the world model learns (the Qs fit the new task under the "
                             "prior as it is) before the policy's first step")
    self_label_every: int = setting(0, "every K-th step the prior acts in on the new task, the model's own planner "
                                    "labels the state, and the planner term (--planner-coef) teaches the prior "
                                    "those labels (0: none)")
    anchor_coef: float = setting(0.0, "weight of a term that holds the prior to the model's as the run starts: the "
                                 "MSE between their eval-mode actions on every batch state (0: none)")
    trainable: str = setting("all", "what the updates move: all (every weight) or embedding (the new task's embedding "
                         "row alone: the old tasks' outputs stay bit for bit)", choices=TRAINABLE)

    min_steps: ClassVar[int] = 0  # --steps 0: the task added and its row chosen, nothing trained

    def __post_init__(self):
        super().__post_init__()
        if self.steps == 0 and self.init_from == AUTO and self.start_by == "loss":
            raise ValueError("--steps 0 adds the task without a seed phase for --start-by loss to measure on: "
                             "choose its row by --start-by return or --init-from TASK")
        r = self.replay_ratio
        if not (isinstance(r, (int, float)) and math.isfinite(r) and 0 < r < 1):
            raise ValueError(f"--replay-ratio must be a number between 0 and 1 (exclusive), got {r!r}")
        check_min(self, 0, "planner_coef")
        check_min(self, 1, "start_episodes")
        check_min(self, 0, "pi_warmup")
        check_min(self, 0, "anchor_coef", "self_label_every")
        if self.self_label_every and self.mpc:
            raise ValueError("--self-label-every labels the states the prior acts in; with --mpc the acting planner "
                             "labels every step: drop one of them")
        if self.init_from == AUTO and self.start_by == "loss" and self.seed_steps == 0:
            raise ValueError("--start-by loss measures on the seed phase's random episodes: give --seed-steps > 0, "
                             "--start-by return, or name the task to start from (--init-from TASK)")


class BatchLabels:
    """The planner labels of a batch's rows, [B, 3A] for the model's A. In a mixed batch (`mixed`) the old
    tasks' rows (index >= 0) get the replayed data's own (its `planner` field) when `dataset` is given, and the
    new task's rows (index -1 - s: the online replay's slice s) the self-labels `replay` keeps when it is
    given; otherwise every row is the replay's slice `index`. A row with no label is NaN, which
    `planner_distill_loss` leaves out."""

    def __init__(self, action_dim: int, mixed: bool, dataset=None, replay: Replay | None = None):
        from edge_tdmpc.distill.labels import FieldLabels
        self.dim, self.mixed, self.replay = 3 * action_dim, mixed, replay
        self.data = FieldLabels(dataset) if dataset is not None else None

    def _fit(self, rows):  # each of (mean, std, eval_action) to the model's action dims
        return torch.cat(split_plan_label(rows, self.dim // 3), -1)

    def lookup(self, index) -> torch.Tensor:
        out = torch.full((len(index), self.dim), float("nan"))
        old = index >= 0 if self.mixed else torch.zeros_like(index, dtype=torch.bool)
        if self.data is not None and old.any():
            out[old] = self._fit(self.data.lookup(index[old]))
        if self.replay is not None and (~old).any():
            s = -1 - index[~old] if self.mixed else index
            out[~old] = self._fit(self.replay.labels(s.numpy()))
        return out


class MixedSampler:
    """Batches of `batch_size` slices: `replay`'s (the new task's episodes, `replay.batch_size` of them) and the
    rest from `dataset` (the old tasks'), its task indices mapped to the model's and padded to its dims."""

    def __init__(self, replay: Replay, dataset, model_tasks, batch_size: int, seed: int, horizon: int = 3):
        self.replay = replay
        self.old = SliceSampler(dataset, horizon, batch_size - replay.batch_size, seed, prefetch=False)
        self.to_model = torch.tensor([model_tasks.index(t) for t in dataset.tasks])

    def sample(self) -> Batch:
        new, old = self.replay.sample(), self.old.sample()
        O, A = new.obs.shape[-1], new.action.shape[-1]
        return Batch(torch.cat([new.obs, fit_dim(old.obs, O)], 1), torch.cat([new.action, fit_dim(old.action, A)], 1),
                     torch.cat([new.reward, old.reward], 1), torch.cat([new.task, self.to_model[old.task]]),
                     torch.cat([-1 - new.index, old.index]))  # < 0: the online replay's slice, not the data's

    def state_dict(self) -> dict:
        return dict(old=self.old.state_dict())

    def load_state_dict(self, state):
        self.old.load_state_dict(state["old"])


def train_new_row_only(model, row: int):
    """Fix every weight of `model` but its task embedding, and keep that embedding's gradient to `row` (a
    replayed old task's lookup would otherwise move its own row); Adam then leaves the other rows exactly as they
    are (their moments stay 0, so their steps are 0)."""
    model.requires_grad_(False)
    weight = model._task_emb.weight.requires_grad_(True)
    keep = torch.zeros(weight.shape[0], 1, device=weight.device)
    keep[row] = 1
    weight.register_hook(lambda grad: grad * keep)


def returns_by_row(model, task: str, row: int, episodes: int, steps: int, seed: int, among=None) -> dict[str, float]:
    """{every other task of `model`, or those of `among` (which may name row `row`'s own task: its row as it is):
    the mean return of its prior (eval mode) on `task` with row `row` of the embedding set to that task's}: the
    start that already acts best on the new task, on the same initial states for every row. Leaves the row as it
    found it."""
    from edge_tdmpc.distill.loop import closed_loop_eval
    emb = model._task_emb.weight
    was, training = emb[row].detach().clone(), model.training
    out = {}
    for i, name in enumerate(model.cfg.tasks):
        if (i == row) if among is None else (name not in among):
            continue
        with torch.no_grad():
            emb[row] = emb[i]
        out[name] = closed_loop_eval(model, [task], episodes, steps, seed)[task]
    with torch.no_grad():
        emb[row] = was
    model.train(training)
    return out


def finetune(checkpoint, task: str, out, options: FinetuneOptions | None = None, *, resume=False, progress=True,
             echo=print, **settings) -> dict:
    """Add `task` to the multi-task model in `checkpoint` and train it online on `task` for `steps` environment
    steps -> out/model.pt (official layout, one more task), out/new_task.json, metrics.

    `settings` override fields of `options` (FinetuneOptions: the flags of `edge-tdmpc finetune`); any others
    are TrainConfig fields (lr, tau, ...). `resume` continues the run in `out`."""
    own, train_overrides = split_settings(FinetuneOptions, settings)
    opts = replace(options or FinetuneOptions(), **own).schedule()
    base = load_model(checkpoint)
    model = add_task(base, task, base.cfg.tasks[0] if opts.init_from == AUTO else opts.init_from)
    model = model.float().requires_grad_(True)
    mc, new = model.cfg, len(model.cfg.tasks) - 1
    if opts.trainable == "embedding":
        train_new_row_only(model, new)
    dataset = None
    if opts.replay:
        dataset = EpisodeDataset(opts.replay)
        check_task_subset(dataset.tasks, base.cfg.tasks, "the model")
        if dataset.obs_dim > mc.obs_dim or dataset.action_dim > mc.action_dim:
            raise ValueError(f"--replay {opts.replay} has dims {dataset.obs_dim}/{dataset.action_dim}, the model "
                             f"{mc.obs_dim}/{mc.action_dim}: replay data of the model's own tasks")
    if opts.replay_labels and not dataset:
        raise ValueError("--replay-labels teaches the prior the labels of the replayed data: give --replay DATA")
    # the anchor is the `policy` distillation term with the model as it starts as its teacher, at d_coef
    labelled = opts.replay_labels or opts.self_label_every > 0
    terms = ("planner",) * labelled + ("policy",) * (opts.anchor_coef > 0)
    cfg = TrainConfig.make(batch_size=opts.batch_size, seed=opts.seed, distill=terms, d_coef=opts.anchor_coef,
                           planner_coef=opts.planner_coef, planner_filter=opts.planner_filter,
                           pi_warmup=opts.pi_warmup, **train_overrides)

    def start_model(name):  # the model before its first update, the new row `name`'s: the anchor's teacher
        return Teacher(add_task(base, task, name).float()) if opts.anchor_coef > 0 else None

    old_rows = round(opts.batch_size * opts.replay_ratio) if dataset else 0
    if dataset and not 0 < old_rows < opts.batch_size:
        raise ValueError(f"--replay-ratio {opts.replay_ratio} of --batch-size {opts.batch_size} leaves no slice for "
                         "one side: use a larger batch or a ratio nearer 0.5")
    replay = Replay(mc.obs_dim, mc.action_dim, batch_size=opts.batch_size - old_rows, seed=opts.seed,
                    label_dim=3 * mc.action_dim if opts.self_label_every else 0)
    labels = BatchLabels(mc.action_dim, dataset is not None, dataset if opts.replay_labels else None,
                         replay if opts.self_label_every else None) if labelled else None
    # with an auto start the row is measured later (anchor_to_start): until then a stand-in of the same shape
    trainer = Trainer(model, cfg, teacher=start_model(mc.tasks[0] if opts.init_from == AUTO else opts.init_from),
                      plan_labels=labels)

    def anchor_to_start():  # new_task.json, written at the first update, names the row the run started from
        if opts.anchor_coef > 0:
            trainer.teacher = start_model(json.loads((out / CHOICE).read_text())["init_from"])
    sampler = MixedSampler(replay, dataset, mc.tasks, opts.batch_size, derive_seed(opts.seed, 1)) if dataset else None
    run_settings = dict(checkpoint_sha256=file_sha256(checkpoint), task=task, **asdict(opts), train=asdict(cfg))
    out = Path(out)

    def start_from(name):
        with torch.no_grad():
            model._task_emb.weight[new] = model._task_emb.weight[mc.tasks.index(name)]

    def announce(what, ranking):
        echo(f"{task} starts from {ranking[0][0]}'s embedding ({what} {ranking[0][1]:.4g}; next: "
             + ", ".join(f"{t} {v:.4g}" for t, v in ranking[1:3]) + ")")

    choice = {}
    if opts.init_from == AUTO and opts.start_by == "return":  # measured before the run acts, so it acts from it
        if resume and (out / CHOICE).exists():
            choice = json.loads((out / CHOICE).read_text())
        else:
            returns = returns_by_row(model, task, new, opts.start_episodes, opts.episode_steps, opts.seed + 20_000)
            ranking = sorted(returns.items(), key=lambda tr: -tr[1])
            choice = dict(task=task, start_by="return", prior_return=returns,
                          played=opts.start_episodes * opts.episode_steps, init_from=ranking[0][0],
                          tied=[t for t, r in ranking if r == ranking[0][1]])  # written once the run has begun
            announce("prior's return", ranking)
        start_from(choice["init_from"])  # a resumed checkpoint then loads over it
    if resume and (out / CHOICE).exists():  # anchored to the start, not to the checkpoint it resumes from
        anchor_to_start()
    if opts.steps == 0:  # the start a fine-tune would take, as a model: the new row borrowed, no update
        if (out / "model.pt").exists() and not resume:
            raise ValueError(f"{out} already holds a model; pick a new --out")
        out.mkdir(parents=True, exist_ok=True)
        choice = choice or dict(task=task, init_from=opts.init_from)
        write_json(out / CHOICE, choice)
        save_model(model, out / "model.pt")
        return dict(model=str(out / "model.pt"), env_steps=0, updates=0, episodes=0, tasks=list(mc.tasks),
                    init_from=choice["init_from"])

    def before_first_update(replay):
        candidates = choice.get("tied", mc.tasks[:new])
        if opts.init_from == AUTO and len(candidates) > 1:  # the old rows are still the base model's: rank with it
            eps = replay.episodes
            ranking = [(t, v) for t, v in most_similar_task(base, [(e["obs"], e["action"], e["reward"]) for e in eps])
                       if t in candidates]
            start_from(ranking[0][0])
            write_json(out / CHOICE, dict(choice, task=task, start_by=opts.start_by, init_from=ranking[0][0],
                                          measured_on=int(sum(len(e["action"]) for e in eps)),
                                          world_model_loss=dict(ranking)))
            announce("world-model loss" + (" among the rows tied on return" if choice else ""), ranking)
        else:
            write_json(out / CHOICE, choice or dict(task=task, init_from=opts.init_from))
        anchor_to_start()
        # a trained model's Q values are far from the running scale's start of 1 (see Trainer.warm_scale)
        trainer.warm_scale(replay.sample() if sampler is None else sampler.sample())

    summary = run_online(trainer, replay, [(task, new)], out, opts, run_settings, sampler=sampler,
                         before_first_update=before_first_update, label_every=opts.self_label_every,
                         resume=resume, progress=progress, echo=echo)
    if choice and not (out / CHOICE).exists():  # a run shorter than its seed phase
        write_json(out / CHOICE, choice)
    choice = json.loads((out / CHOICE).read_text()) if (out / CHOICE).exists() else {}  # None: no update yet
    return dict(summary, tasks=list(mc.tasks), init_from=choice.get("init_from") if opts.init_from == AUTO
                else opts.init_from)
