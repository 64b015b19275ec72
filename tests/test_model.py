import numpy as np
import pytest
import torch

from edge_tdmpc import WorldModel, make_config
from edge_tdmpc.config import PRESETS
from edge_tdmpc.layers import SimNorm
from edge_tdmpc.model import soft_ce, two_hot, two_hot_inv
from edge_tdmpc.tasks import MT30, MT30_DIMS


@pytest.mark.parametrize("size", sorted(PRESETS))
def test_preset_shapes(size):
    with torch.device("meta"):  # shapes and counts only: the 317M model needs no memory this way
        model = WorldModel(make_config("mt30", size=size))
    p, cfg = PRESETS[size], model.cfg
    assert model._encoder["state"][0].weight.shape == (p["enc_dim"], 24 + 96)
    assert len(model._encoder["state"]) == p["num_enc_layers"]
    assert model._encoder["state"][-1].weight.shape == (p["latent_dim"], p["enc_dim"])
    assert model._dynamics[0].weight.shape == (p["mlp_dim"], p["latent_dim"] + 96 + 6)
    assert model._reward[-1].weight.shape == (101, p["mlp_dim"])
    assert model._pi[-1].weight.shape == (12, p["mlp_dim"])
    assert model._Qs.params[0].weight.shape == (p["num_q"], p["mlp_dim"], p["latent_dim"] + 96 + 6)
    assert len(model._target_Qs) == cfg.num_q == p["num_q"]
    # the nominal sizes (millions of trainable parameters) of the paper, within 10% (MT30's 1M model is 1.43M)
    assert abs(model.total_params - size * 1e6) < 0.1 * size * 1e6 or size == 1


def test_1m_parameter_count_matches_facts():
    model = WorldModel(make_config("mt30", size=1))
    assert model.total_params == 1_426_427
    stored = sum(v.numel() for k, v in model.state_dict().items()
                 if k not in ("log_std_min", "log_std_dif", "_action_masks"))
    assert stored == 1_980_357
    # a model made trainable as a whole (a student from the teacher's weights) still holds its target Qs fixed
    assert model.requires_grad_(False).requires_grad_(True).total_params == 1_426_427
    assert not any(p.requires_grad for p in model._target_Qs.parameters())


def test_two_hot_round_trip():
    x = torch.tensor([-500.0, -3.7, -0.2, 0.0, 0.01, 1.0, 42.0, 2000.0]).unsqueeze(-1)
    enc = two_hot(x)
    assert torch.allclose(enc.sum(-1), torch.ones(len(x)))
    assert ((enc > 0).sum(-1) <= 2).all()
    dec = two_hot_inv(torch.log(enc + 1e-30))
    assert torch.allclose(dec, x, rtol=1e-4, atol=1e-4)
    # soft cross-entropy is minimal at the encoded target
    logits = torch.log(enc + 1e-30)
    assert (soft_ce(logits, x) <= soft_ce(torch.zeros_like(logits), x)).all()


def test_two_hot_saturates_at_range():
    big = torch.tensor([[1e9]])
    assert two_hot(big)[0, -1] == 1.0
    assert torch.isclose(two_hot_inv(torch.log(two_hot(big) + 1e-30)), torch.expm1(torch.tensor(10.0)))


def test_simnorm_groups_sum_to_one():
    x = torch.randn(4, 128) * 10
    y = SimNorm(8)(x).view(4, 16, 8)
    assert torch.allclose(y.sum(-1), torch.ones(4, 16), atol=1e-6)
    assert (y >= 0).all()


def test_action_masks_zero_unused_dims(tiny_model):
    z = torch.randn(5, tiny_model.cfg.latent_dim)
    for task in ("pendulum-swingup", "reacher-three-easy", "walker-walk"):
        i, a_dim = MT30.index(task), MT30_DIMS[task][1]
        action, mean = tiny_model.pi(z, i)
        assert (action[:, a_dim:] == 0).all() and (mean[:, a_dim:] == 0).all()
        assert (action[:, :a_dim] != 0).any()
    tasks = torch.tensor([MT30.index("pendulum-swingup"), MT30.index("walker-walk")])
    action, _ = tiny_model.pi(torch.randn(2, tiny_model.cfg.latent_dim), tasks)
    assert (action[0, 1:] == 0).all() and (action[1] != 0).all()


def test_task_embedding_max_norm(tiny_model):
    with torch.no_grad():
        tiny_model._task_emb.weight.mul_(100)
    tiny_model.encode(torch.zeros(1, 24), 3)
    assert tiny_model._task_emb.weight[3].norm() <= 1 + 1e-5


def test_policy_squashing_and_log_std(tiny_model):
    z = torch.randn(64, tiny_model.cfg.latent_dim) * 50
    action, info = tiny_model.pi_info(z, MT30.index("walker-run"))
    assert action.abs().max() <= 1 and info["mean"].abs().max() <= 1
    assert info["log_std"].min() >= -10 - 1e-5 and info["log_std"].max() <= 2 + 1e-5
    assert torch.isfinite(info["scaled_entropy"]).all()


def test_q_return_types(tiny_model):
    z, a = torch.randn(7, tiny_model.cfg.latent_dim), torch.rand(7, 6) * 2 - 1
    allq = tiny_model.Q(z, a, 0, "all")
    assert allq.shape == (2, 7, 101)
    heads = two_hot_inv(allq)
    assert torch.allclose(tiny_model.Q(z, a, 0, "avg"), heads.mean(0), atol=1e-5)
    assert torch.allclose(tiny_model.Q(z, a, 0, "min"), heads.min(0).values)
    with pytest.raises(ValueError, match="return_type"):
        tiny_model.Q(z, a, 0, "max")


def test_single_task_model():
    model = WorldModel(make_config("cartpole-swingup", size=1)).eval()
    assert model.cfg.obs_dim == 5 and model.cfg.action_dim == 1 and model.cfg.task_dim == 0
    z = model.encode(torch.zeros(3, 5), None)
    action, _ = model.pi(z, None)
    assert action.shape == (3, 1)


def test_wrong_obs_length_is_one_line_error(tiny_model):
    with pytest.raises(ValueError, match="expects 24") as e:
        tiny_model.encode(torch.zeros(1, 17), 3)
    assert "\n" not in str(e.value)


PARITY_TASKS = ["walker-stand", "cheetah-run", "reacher-easy", "cartpole-swingup", "fish-swim", "reacher-three-easy"]


@pytest.mark.parametrize("task", PARITY_TASKS)
def test_world_model_matches_official_outputs(student, parity_npz, task):
    d = {k.split("/")[-1]: parity_npz[k] for k in parity_npz.files if k.startswith(f"model/{task}/")}
    obs, act = torch.tensor(d["obs_padded"]), torch.tensor(d["action_padded"])
    i = torch.full((len(obs),), MT30.index(task))
    with torch.no_grad():
        z = student.encode(obs, i)
        ours = dict(z=z, z_next=student.next(z, act, i), reward_logits=student.reward(z, act, i),
                    reward=two_hot_inv(student.reward(z, act, i)), q_heads=two_hot_inv(student.Q(z, act, i, "all")),
                    pi_mean=student.pi(z, i)[1])
    for name, ref in ours.items():
        ref_np = d[name]
        scale = max(1.0, float(np.abs(ref_np).max()))
        np.testing.assert_allclose(ref.numpy().reshape(ref_np.shape), ref_np, atol=2e-5 * scale, err_msg=name)
