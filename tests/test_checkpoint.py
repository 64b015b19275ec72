import pickle
import warnings

import pytest
import torch

from edge_tdmpc import CheckpointError, load_model, save_model
from edge_tdmpc.checkpoint import read_state_dict, to_internal, to_official


def test_real_checkpoint_loads_exactly(checkpoint_path):
    model = load_model(checkpoint_path)
    cfg = model.cfg
    assert (cfg.size, len(cfg.tasks), cfg.latent_dim, cfg.num_q) == (1, 30, 128, 2)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    raw = read_state_dict(checkpoint_path)
    own = model.state_dict()
    for k, v in to_internal(raw).items():
        assert torch.equal(own[k], v.float()), k
    assert len(to_internal(raw)) == len([k for k in own if k not in ("log_std_min", "log_std_dif", "_action_masks")])


def test_save_load_round_trip_in_official_layout(student, tmp_path):
    path = tmp_path / "student.pt"
    save_model(student, path)
    raw = torch.load(path, weights_only=True)["model"]
    # the newer official layout: per-layer ensemble keys, detach/target copies and tensordict bookkeeping
    assert "_Qs.params.0.weight" in raw and "_detach_Qs_params.2.weight" in raw
    assert "_target_Qs_params.1.ln.bias" in raw and "_Qs.params.__batch_size" in raw
    assert "_action_masks" in raw and "log_std_dif" in raw
    again = load_model(path)
    for (k, a), b in zip(student.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_random_official_layout_state_dict_loads(tiny_model, tmp_path):
    # a state dict built by hand in the official newer layout (as official code writes it) loads
    sd = to_official({k: v.clone() for k, v in tiny_model.state_dict().items()}, tiny_model.cfg.num_q)
    torch.save({"model": sd}, tmp_path / "newer.pt")
    model = load_model(tmp_path / "newer.pt")
    assert model.cfg.latent_dim == 16 and model.cfg.size is None
    assert torch.equal(model._Qs.params[1].weight, tiny_model._Qs.params[1].weight)
    # and the older flat layout of the same weights
    slots = ("weight", "bias", "ln.weight", "ln.bias")
    old = {k: v for k, v in tiny_model.state_dict().items()
           if not k.startswith(("_Qs", "_target_Qs")) and k not in ("log_std_min", "log_std_dif", "_action_masks")}
    for prefix in ("_Qs", "_target_Qs"):
        ens = getattr(tiny_model, prefix)
        for layer_i, layer in enumerate(ens.params):
            for s_i, slot in enumerate(slots):
                if layer.ln is None and slot.startswith("ln"):
                    continue
                owner = layer.ln if slot.startswith("ln.") else layer
                t = getattr(owner, slot.removeprefix("ln."))
                old[f"{prefix}.params.{4 * layer_i + s_i}"] = t.detach().clone().half()
    torch.save({"model": old}, tmp_path / "older.pt")
    model = load_model(tmp_path / "older.pt")
    assert torch.equal(model._target_Qs.params[2].weight, tiny_model._target_Qs.params[2].weight.half().float())


@pytest.mark.parametrize("name", ["int8", "mixed"])
def test_paper_quantized_files_load_with_warning(checkpoint_path, name):
    path = checkpoint_path.parent / f"mt30-1M-distilled-{name}.pt"
    with pytest.warns(UserWarning, match="scale 1.0"):
        model = load_model(path)
    assert next(model.parameters()).dtype == torch.float32
    fp16 = load_model(checkpoint_path)
    # mixed: everything but the Q ensembles is the fp16 file; int8: most weights rounded to 0
    same = torch.equal(model._dynamics[0].weight, fp16._dynamics[0].weight)
    assert same == (name == "mixed")
    zeros = (model._Qs.params[1].weight == 0).float().mean()
    assert zeros > 0.5


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_pickle_that_would_run_code_is_refused(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"model": {"x": _RunsCode(marker), "w": torch.zeros(2)}}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(CheckpointError, match="refused to unpickle") as e:
        load_model(path)
    assert not marker.exists()
    assert "\n" not in str(e.value)


def test_not_a_pytorch_file(tmp_path):
    (tmp_path / "notes.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint file"):
        load_model(tmp_path / "notes.pt")


def test_truncated_checkpoint(checkpoint_path, tmp_path):
    data = checkpoint_path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(tmp_path / "cut.pt")


def test_wrong_shape_names_key_and_shapes(tiny_model, tmp_path):
    sd = to_official(dict(tiny_model.state_dict()), 2)
    sd["_reward.1.weight"] = torch.zeros(32, 31)
    torch.save({"model": sd}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"'_reward.1.weight'.*\(32, 31\).*\(32, 32\)"):
        load_model(tmp_path / "bad.pt")


def test_missing_key_named(tiny_model, tmp_path):
    sd = to_official(dict(tiny_model.state_dict()), 2)
    del sd["_pi.1.ln.weight"]
    torch.save({"model": sd}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="_pi.1.ln.weight"):
        load_model(tmp_path / "bad.pt")


def test_checkpoint_of_another_task_set(checkpoint_path, tmp_path):
    with pytest.raises(CheckpointError, match="task-set mismatch|obs_dim"):
        load_model(checkpoint_path, tasks="cartpole-swingup")
    sd = read_state_dict(checkpoint_path)
    sd["_task_emb.weight"] = torch.zeros(80, 96)
    torch.save({"model": sd}, tmp_path / "mt80ish.pt")
    with pytest.raises(CheckpointError, match="80 rows.*mt80"):
        load_model(tmp_path / "mt80ish.pt")


def test_not_a_checkpoint(tmp_path):
    torch.save({"step": 3}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="not a TD-MPC2 checkpoint"):
        load_model(tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing.pt")


def test_load_in_half_precision(checkpoint_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_model(checkpoint_path, dtype=torch.float16)
    assert model._pi[0].weight.dtype == torch.float16
