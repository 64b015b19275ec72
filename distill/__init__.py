"""Distillation: train a compact TD-MPC2 student (TD-MPC-Opt) or a from-scratch one, online or offline.

    from edge_tdmpc.distill import distill, train
    train("cartpole-balance,cartpole-swingup", "runs/teacher", size=None, dims=dict(mlp_dim=128))   # online
    distill("data/", "runs/student", teacher="runs/teacher/model.pt", d_coef=0.4)                     # offline

The settings of `distill` and `train` (the flags of `edge-tdmpc distill` and `edge-tdmpc train`) are
`DistillOptions` and `OnlineOptions`; keyword arguments override their fields. Data (episode format, sampler,
convert, collect) lives in `edge_tdmpc.distill.data` and friends.
"""
from edge_tdmpc.distill.losses import DISTILL_TERMS
from edge_tdmpc.distill.offline import DistillOptions, distill
from edge_tdmpc.distill.online import OnlineOptions, train
from edge_tdmpc.distill.teacher import LabelCache, Teacher
from edge_tdmpc.distill.trainer import TrainConfig, Trainer

__all__ = ["DISTILL_TERMS", "DistillOptions", "LabelCache", "OnlineOptions", "Teacher", "TrainConfig", "Trainer",
           "distill", "train"]
