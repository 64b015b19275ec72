"""Offline data: the episode format, the slice sampler, the official-file converter and teacher collection."""
import dataclasses
import json
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import make_tiny_model

from edge_tdmpc import save_model
from edge_tdmpc.cli import main
from edge_tdmpc.distill import convert as convert_mod
from edge_tdmpc.distill.collect import CollectOptions, collect
from edge_tdmpc.distill.convert import convert
from edge_tdmpc.distill.data import EpisodeDataset, EpisodeWriter
from edge_tdmpc.distill.sampler import SliceSampler
from edge_tdmpc.tasks import MT30

H = 3


def coded_episode(e, T, obs_dim=5, action_dim=2):
    """Episode e of T steps whose entries say where they are from: obs[t] = (e, t, ..), action[t] = (e, t)."""
    obs = np.zeros((T + 1, obs_dim), np.float32)
    obs[:, 0], obs[:, 1] = e, np.arange(T + 1)
    action = np.stack([np.full(T, e), np.arange(T)], 1).astype(np.float32)[:, :action_dim]
    reward = (1000 * e + np.arange(T)).astype(np.float32)
    return obs, action, reward


def write_coded(root, lengths, shard_rows=64, tasks=("a", "b", "c"), obs_dim=6, action_dim=3):
    with EpisodeWriter(root, obs_dim, action_dim, tasks, shard_rows=shard_rows) as w:
        for e, T in enumerate(lengths):
            w.add(*coded_episode(e, T), task=e % len(tasks), key=e)
    return EpisodeDataset(root)


LENGTHS = [1, 2, 3, 4, 7, 30, 3, 12, 50, 5, 9, 3]  # includes episodes too short to slice (T < H)


def test_writer_dataset_round_trip(tmp_path):
    ds = write_coded(tmp_path, LENGTHS[:6])
    with EpisodeWriter(tmp_path, 6, 3, ("a", "b", "c"), shard_rows=64) as w:  # append in a second session
        for e, T in enumerate(LENGTHS[6:], start=6):
            w.add(*coded_episode(e, T), task=e % 3, key=e)
    ds = EpisodeDataset(tmp_path)
    index = json.loads((tmp_path / "index.json").read_text())
    assert len(index["shards"]) > 2, "small shard_rows should have split the data"
    assert (ds.num_episodes, ds.num_transitions) == (len(LENGTHS), sum(LENGTHS)) == (
        index["num_episodes"], index["num_transitions"])
    assert (ds.obs_dim, ds.action_dim, ds.tasks) == (6, 3, ("a", "b", "c"))
    assert not list(tmp_path.glob("*.tmp")), "atomic writes leave no temporaries"
    for e, T in enumerate(LENGTHS):
        ep, (obs, action, reward) = ds.episode(e), coded_episode(e, T)
        np.testing.assert_array_equal(ep["obs"], np.pad(obs, ((0, 0), (0, 1))))  # zero-padded to obs_dim
        np.testing.assert_array_equal(ep["action"], np.pad(action, ((0, 0), (0, 1))))
        np.testing.assert_array_equal(ep["reward"], reward)
        assert (ep["task"], ep["key"]) == (e % 3, e)


def test_writer_rejects_bad_episodes_and_mismatched_appends(tmp_path):
    with EpisodeWriter(tmp_path, 4, 2, ["a"]) as w:
        obs, action, reward = coded_episode(0, 5, obs_dim=4)
        with pytest.raises(ValueError, match="T\\+1"):
            w.add(obs[:-1], action, reward, task=0)
        with pytest.raises(ValueError, match="more than"):
            w.add(np.zeros((6, 5)), action, reward, task=0)
        with pytest.raises(ValueError, match="task index"):
            w.add(obs, action, reward, task=1)
        bad = reward.copy()
        bad[2] = np.nan
        with pytest.raises(ValueError, match="NaN"):
            w.add(obs, action, bad, task=0)
        with pytest.raises(ValueError, match="another process"):
            EpisodeWriter(tmp_path, 4, 2, ["a"])  # one writer per directory
        w.add(obs, action, reward, task=0)
    with pytest.raises(ValueError, match="cannot append"):
        EpisodeWriter(tmp_path, 5, 2, ["a"])
    assert EpisodeDataset(tmp_path).num_episodes == 1


def test_crash_leftovers_are_overwritten_and_damage_is_named(tmp_path):
    write_coded(tmp_path, [5, 6])
    (tmp_path / "shard-000001.obs.npy").write_bytes(b"half-written by a killed writer")
    ds = write_coded(tmp_path, [7])  # appends shard 1 over the leftover
    assert ds.num_episodes == 3 and ds.episode(2)["obs"].shape == (8, 6)
    (tmp_path / "shard-000000.reward.npy").unlink()
    with pytest.raises(ValueError, match="shard-000000.reward.npy"):
        EpisodeDataset(tmp_path)
    with pytest.raises(ValueError, match="not an edge-tdmpc dataset"):
        EpisodeDataset(tmp_path / "nothing")


def check_slices(ds, batch):
    """Every slice comes from one episode, consecutive steps, with its own task and global index."""
    obs, action, reward, task, index = (x.numpy() for x in batch)
    offset = np.concatenate([[0], np.cumsum(LENGTHS)[:-1]])
    for b in range(obs.shape[1]):
        e, t0 = int(obs[0, b, 0]), int(obs[0, b, 1])
        assert 0 <= t0 <= LENGTHS[e] - H, "slice runs past its episode's end"
        np.testing.assert_array_equal(obs[:, b, 0], e)
        np.testing.assert_array_equal(obs[:, b, 1], t0 + np.arange(H + 1))
        np.testing.assert_array_equal(action[:, b, :2], np.stack([np.full(H, e), t0 + np.arange(H)], 1))
        np.testing.assert_array_equal(reward[:, b, 0], 1000 * e + t0 + np.arange(H))
        assert task[b] == e % 3 and index[b] == offset[e] + t0


def test_sampler_never_crosses_episode_boundaries_and_is_uniform(tmp_path):
    ds = write_coded(tmp_path, LENGTHS)
    sampler = SliceSampler(ds, horizon=H, batch_size=512, seed=1)
    valid = np.maximum(np.array(LENGTHS) - H + 1, 0)
    assert sampler.num_valid_slices == ds.num_valid_slices(H) == valid.sum()
    counts = np.zeros(len(LENGTHS))
    for _ in range(40):
        batch = sampler.sample()
        assert [tuple(x.shape) for x in batch] == [(H + 1, 512, 6), (H, 512, 3), (H, 512, 1), (512,), (512,)]
        assert batch.task.dtype == torch.long and batch.index.dtype == torch.long
        check_slices(ds, batch)
        counts += np.bincount(batch.obs[0, :, 0].long().numpy(), minlength=len(LENGTHS))
    # uniform over valid starts: episode frequency ~ its number of starts (20480 draws; 5 sigma)
    expect = counts.sum() * valid / valid.sum()
    assert np.all(np.abs(counts - expect) <= 5 * np.sqrt(expect) + 1e-9), (counts, expect)


def test_mmap_and_pread_read_the_same(tmp_path):
    write_coded(tmp_path, LENGTHS)
    a = SliceSampler(EpisodeDataset(tmp_path, io="mmap"), horizon=H, batch_size=64, seed=5)
    b = SliceSampler(EpisodeDataset(tmp_path, io="pread"), horizon=H, batch_size=64, seed=5)
    for _ in range(3):
        for x, y in zip(a.sample(), b.sample(), strict=True):
            assert torch.equal(x, y)
    with pytest.raises(ValueError, match="io="):
        EpisodeDataset(tmp_path, io="mmapp")
    again = pickle.loads(pickle.dumps(b.dataset))  # travels as its path
    assert len(pickle.dumps(b.dataset)) < 300 and again.num_transitions == b.dataset.num_transitions


def test_slice_starts_and_gather(tmp_path):
    ds = write_coded(tmp_path, LENGTHS)
    starts = np.concatenate(list(ds.slice_starts(H, chunk=7)))
    offset = np.concatenate([[0], np.cumsum(LENGTHS)[:-1]])
    expect = np.concatenate([o + np.arange(max(T - H + 1, 0)) for o, T in zip(offset, LENGTHS, strict=True)])
    np.testing.assert_array_equal(starts, expect)
    check_slices(ds, ds.gather(starts, H))
    with pytest.raises(ValueError, match="past its episode"):
        ds.gather([offset[4] + LENGTHS[4] - H + 1], H)


def test_sampler_resume_continues_the_same_stream(tmp_path):
    ds = write_coded(tmp_path, LENGTHS)
    a = SliceSampler(ds, horizon=H, batch_size=16, seed=7)
    for _ in range(5):
        a.sample()
    torch.save(a.state_dict(), tmp_path / "sampler.pt")
    expected = [a.sample() for _ in range(4)]
    for prefetch in (True, False):  # reading ahead in a thread changes neither the stream nor the state
        b = SliceSampler(EpisodeDataset(tmp_path), horizon=H, batch_size=16, seed=123, prefetch=prefetch)
        b.sample()
        b.load_state_dict(torch.load(tmp_path / "sampler.pt", weights_only=True))
        for want, got in zip(expected, (b.sample() for _ in range(4)), strict=True):
            for x, y in zip(want, got, strict=True):
                assert torch.equal(x, y)
        assert b.state_dict()["batches"] == 9 and str(b.state_dict()) == str(a.state_dict())
    with pytest.raises(ValueError, match="same settings"):
        SliceSampler(ds, horizon=H, batch_size=8).load_state_dict(a.state_dict())


def test_rank_split_reassembles_the_global_batch(tmp_path):
    ds = write_coded(tmp_path, LENGTHS)
    whole = SliceSampler(ds, horizon=H, batch_size=24, seed=3)
    ranks = [SliceSampler(ds, horizon=H, batch_size=8, seed=3, rank=r, world_size=3) for r in range(3)]
    for _ in range(3):
        want, parts = whole.sample(), [r.sample() for r in ranks]
        for f, x in enumerate(want):
            axis = 1 if x.dim() == 3 else 0
            assert torch.equal(x, torch.cat([p[f] for p in parts], dim=axis))
    with pytest.raises(ValueError, match="rank"):
        SliceSampler(ds, rank=2, world_size=2)


# --- the official dataset layout -------------------------------------------------------------------------
def official_file(path, E=5, L=9, obs_dim=24, action_dim=6, tasks=(3, 7, 3, 12, 29), tensordict=True):
    """A small file in the official layout: batch [E, L], action/reward one row late with NaN in row 0."""
    g = torch.Generator().manual_seed(0)
    task = torch.tensor([tasks[i % len(tasks)] for i in range(E)], dtype=torch.int32)
    fields = dict(obs=torch.randn(E, L, obs_dim, generator=g), reward=torch.rand(E, L, generator=g),
                  action=torch.rand(E, L, action_dim, generator=g), task=task[:, None].repeat(1, L))
    fields["action"][:, 0] = float("nan")
    fields["reward"][:, 0] = float("nan")
    if tensordict:
        from tensordict import TensorDict
        torch.save(TensorDict(fields, batch_size=(E, L)), path)
    else:
        torch.save(fields, path)
    return fields


@pytest.mark.parametrize("kind", ["tensordict", "dict"])
def test_convert_official_layout(tmp_path, kind):
    if kind == "tensordict":
        pytest.importorskip("tensordict")
    src = tmp_path / "src"
    src.mkdir()
    files = [official_file(src / f"chunk_{i}.pt", E=5 + i, tensordict=kind == "tensordict") for i in range(2)]
    summary = convert([src], tmp_path / "out", trust_pickle=True, shard_rows=20, progress=False, echo=print)
    ds = EpisodeDataset(tmp_path / "out")
    assert summary["episodes"] == ds.num_episodes == 11 and ds.num_transitions == 11 * 8
    assert len(ds.shards) == 6, "shard_rows=20 rows / 9-row episodes -> 2-episode chunks"
    assert ds.tasks == MT30 and (ds.obs_dim, ds.action_dim) == (24, 6)
    i = 0
    for f in files:
        for e in range(len(f["obs"])):
            ep = ds.episode(i)
            np.testing.assert_array_equal(ep["obs"], f["obs"][e].numpy())
            np.testing.assert_array_equal(ep["action"], f["action"][e, 1:].numpy())  # now follows obs[t]
            np.testing.assert_array_equal(ep["reward"], f["reward"][e, 1:].numpy())
            assert ep["task"] == f["task"][e, 0]
            i += 1
    lines = []
    convert([src], tmp_path / "out", trust_pickle=True, progress=False, echo=lines.append)  # nothing to do
    assert EpisodeDataset(tmp_path / "out").num_episodes == 11 and "already converted" in lines[0]


def test_convert_resumes_after_an_interruption(tmp_path, monkeypatch):
    official_file(tmp_path / "chunk_0.pt", E=7, tensordict=False)
    convert([tmp_path / "chunk_0.pt"], tmp_path / "whole", trust_pickle=True, shard_rows=20, progress=False)
    real, calls = convert_mod._convert_chunk, []

    def dies_on_third_chunk(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(*args)
    monkeypatch.setattr(convert_mod, "_convert_chunk", dies_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        convert([tmp_path / "chunk_0.pt"], tmp_path / "cut", trust_pickle=True, shard_rows=20, progress=False)
    assert EpisodeDataset(tmp_path / "cut").num_episodes == 4
    monkeypatch.setattr(convert_mod, "_convert_chunk", real)
    convert([tmp_path / "chunk_0.pt"], tmp_path / "cut", trust_pickle=True, shard_rows=20, progress=False)
    whole, cut = EpisodeDataset(tmp_path / "whole"), EpisodeDataset(tmp_path / "cut")
    assert cut.num_episodes == whole.num_episodes == 7
    for e in range(7):
        for k, v in whole.episode(e).items():
            np.testing.assert_array_equal(cut.episode(e)[k], v)


def test_convert_refuses_to_unpickle_without_trust_pickle(tmp_path):
    official_file(tmp_path / "chunk_0.pt", tensordict=False)
    result = CliRunner().invoke(main, ["data", "convert", str(tmp_path / "chunk_0.pt"), "--out",
                                       str(tmp_path / "out")])
    assert result.exit_code == 2 and "--trust-pickle" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    result = CliRunner().invoke(main, ["data", "convert", str(tmp_path / "chunk_0.pt"), "--out",
                                       str(tmp_path / "out"), "--trust-pickle", "--tasks", "mt30"])
    assert result.exit_code == 0, result.output
    assert EpisodeDataset(tmp_path / "out").num_episodes == 5


def test_convert_names_bad_input(tmp_path):
    official_file(tmp_path / "chunk_0.pt", tasks=(3, 7, 3, 45, 1), tensordict=False)
    with pytest.raises(ValueError, match="--tasks mt80"):
        convert([tmp_path / "chunk_0.pt"], tmp_path / "out", trust_pickle=True, progress=False)
    convert([tmp_path / "chunk_0.pt"], tmp_path / "mt80", tasks="mt80", trust_pickle=True, progress=False)
    assert EpisodeDataset(tmp_path / "mt80").tasks[45] == "mw-faucet-open"
    torch.save({"observation": torch.zeros(2, 3, 4)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="no 'obs' entry"):
        convert([tmp_path / "other.pt"], tmp_path / "out2", trust_pickle=True, progress=False)
    with pytest.raises(ValueError, match="unknown task"):
        convert([tmp_path / "chunk_0.pt"], tmp_path / "out3", tasks="walker-wlak", trust_pickle=True)


# --- collection from a teacher ---------------------------------------------------------------------------
COLLECT = dict(tasks="cartpole-balance,reacher-easy", steps=6, progress=False)


def by_key(ds):
    return {(ep["task"], ep["key"]): ep for ep in map(ds.episode, range(ds.num_episodes))}


def test_collect_two_tasks_two_workers_independent_of_worker_count(tmp_path):
    teacher = tmp_path / "tiny.pt"
    save_model(make_tiny_model(), teacher)
    args = ["data", "collect", "--teacher", str(teacher), "--tasks", COLLECT["tasks"], "--episodes", "2",
            "--steps", "6", "--workers", "2", "--noise-std", "0.1", "--out", str(tmp_path / "w2")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    collect(teacher, episodes=2, out_dir=tmp_path / "w1", workers=1, noise_std=0.1, **COLLECT)
    w2, w1 = EpisodeDataset(tmp_path / "w2"), EpisodeDataset(tmp_path / "w1")
    assert w2.num_episodes == 4 and w2.num_transitions == 24 and (w2.obs_dim, w2.action_dim) == (24, 6)
    assert sorted(by_key(w2)) == [(4, 0), (4, 1), (8, 0), (8, 1)]  # reacher-easy = 4, cartpole-balance = 8
    for f in ("obs", "action", "reward"):
        np.testing.assert_array_equal(w2.shards[0][f], w1.shards[0][f])  # same files, byte for byte
    for (task, _), ep in by_key(w2).items():
        own_obs, own_act = {4: (6, 2), 8: (5, 1)}[task]
        assert np.all(ep["obs"][:, own_obs:] == 0) and np.all(ep["action"][:, own_act:] == 0)  # padding
        assert np.abs(ep["action"]).max() <= 1 and np.any(ep["obs"][:, :own_obs] != 0)
    eps = list(by_key(w2).values())
    assert not np.array_equal(eps[0]["obs"], eps[1]["obs"]), "episodes have their own seeds"
    # the index records the settings by their flags' names; the same command (any --workers) resumes
    assert EpisodeDataset(tmp_path / "w2").meta["collect"]["noise_std"] == 0.1
    args[args.index("--workers") + 1] = "0"
    rerun = CliRunner().invoke(main, args)
    assert rerun.exit_code == 0 and "4 of the episodes are already there" in rerun.output, rerun.output
    assert EpisodeDataset(tmp_path / "w2").num_episodes == 4


def test_collect_settings_are_checked_once_for_the_cli_and_the_api(tmp_path):
    meta_keys = set(dataclasses.asdict(CollectOptions())) | {"teacher", "teacher_sha256"}
    assert {"episodes", "noise_std", "teacher_tasks", "workers"} <= meta_keys
    for bad, flag in ((dict(episodes=0), "--episodes"), (dict(steps=0), "--steps"), (dict(workers=-1), "--workers"),
                      (dict(noise_std=-0.1), "--noise-std"), (dict(noise_std=float("nan")), "--noise-std")):
        with pytest.raises(ValueError, match=flag):
            CollectOptions(**bad)
        with pytest.raises(ValueError, match=flag):
            collect("never-read.pt", "cartpole-balance", tmp_path / "x", **bad)
    with pytest.raises(ValueError, match="unknown planner setting"):
        CollectOptions(planner=dict(samples=3))
    teacher = tmp_path / "tiny.pt"
    save_model(make_tiny_model(), teacher)
    r = CliRunner().invoke(main, ["data", "collect", "--teacher", str(teacher), "--tasks", "cartpole-balance",
                                  "--out", str(tmp_path / "y"), "--noise-std", "nan"])
    assert r.exit_code == 2 and "--noise-std must be at least 0, got nan" in r.output, r.output
    assert not (tmp_path / "y").exists()


def test_collect_resumes_and_matches_in_process(tmp_path):
    teacher = tmp_path / "tiny.pt"
    save_model(make_tiny_model(), teacher)
    collect(teacher, episodes=2, out_dir=tmp_path / "whole", workers=0, mpc=False, **COLLECT)
    collect(teacher, episodes=1, out_dir=tmp_path / "parts", workers=0, mpc=False, **COLLECT)
    lines = []
    collect(teacher, episodes=2, out_dir=tmp_path / "parts", workers=0, mpc=False, echo=lines.append,
            **COLLECT)
    assert "already there" in lines[0]
    whole, parts = by_key(EpisodeDataset(tmp_path / "whole")), by_key(EpisodeDataset(tmp_path / "parts"))
    assert sorted(whole) == sorted(parts) and len(whole) == 4
    for k, ep in whole.items():
        np.testing.assert_array_equal(parts[k]["obs"], ep["obs"])
        np.testing.assert_array_equal(parts[k]["action"], ep["action"])
    with pytest.raises(ValueError, match="other settings"):
        collect(teacher, episodes=3, out_dir=tmp_path / "parts", workers=0, mpc=True, **COLLECT)
    with pytest.raises(ValueError, match="unknown task 'cartpole-balanse'"):
        collect(teacher, "cartpole-balanse", tmp_path / "x", episodes=1, workers=0)


def test_collect_with_a_single_task_teacher(tmp_path):
    teacher = tmp_path / "single.pt"
    save_model(make_tiny_model("cartpole-balance"), teacher)
    collect(teacher, "cartpole-balance", tmp_path / "out", episodes=1, steps=5, workers=0,
            teacher_tasks="cartpole-balance", progress=False)
    ds = EpisodeDataset(tmp_path / "out")
    assert ds.tasks == ("cartpole-balance",) and (ds.obs_dim, ds.action_dim, ds.num_transitions) == (5, 1, 5)
    with pytest.raises(ValueError, match="not in the teacher's task set"):
        collect(teacher, "reacher-easy", tmp_path / "x", episodes=1, workers=0, teacher_tasks="cartpole-balance")


# --- memory: bounded RSS on a memory-mapped dataset ------------------------------------------------------
RSS_PROBE = textwrap.dedent("""
    import sys, psutil
    from edge_tdmpc.distill.data import EpisodeDataset
    from edge_tdmpc.distill.sampler import SliceSampler
    root, batches, io = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    sampler = SliceSampler(EpisodeDataset(root, io=io), batch_size=256, seed=0)
    proc = psutil.Process()
    base = peak = proc.memory_info().rss
    for _ in range(batches):
        sampler.sample()
        peak = max(peak, proc.memory_info().rss)
    print((peak - base) / 2**20)
""")


def write_big(root, gib):
    """~gib GiB of 500-step episodes, written a shard at a time (constant fill: content is not the point)."""
    T, rows = 500, 1 << 20
    episodes = int(gib * 2**30 / (4 * (24 + 6 + 1) * (T + 1)))
    obs, action, reward = np.ones((T + 1, 24)), np.ones((T, 6)), np.ones(T)
    with EpisodeWriter(root, 24, 6, MT30, shard_rows=rows) as w:
        for e in range(episodes):
            w.add(obs, action, reward, task=e % 30, key=e)


def rss_growth(root, batches, io):
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(root), str(batches), io],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("gib,batches", [pytest.param(0.25, 200, id="fast"),
                                         pytest.param(1.5, 3000, id="1.5GiB", marks=pytest.mark.slow)])
def test_rss_stays_bounded_while_sampling(tmp_path, gib, batches):
    write_big(tmp_path, gib)
    mapped = rss_growth(tmp_path, batches, io="mmap")
    bounded = rss_growth(tmp_path, batches, io="pread")
    # through memory maps the touched pages pile up in RSS; positional reads keep only the batch
    assert mapped > 0.3 * gib * 1024, f"probe too weak: only {mapped:.0f} MiB touched"
    assert bounded < 32, f"RSS grew by {bounded:.0f} MiB while sampling (through maps: {mapped:.0f} MiB)"


CONVERT_PROBE = textwrap.dedent("""
    import sys, psutil
    from edge_tdmpc.distill import convert as c
    src, out, drop = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    proc, real, rss = psutil.Process(), c._drop_pages, []
    def hook(*args):  # called after each chunk is written: sample RSS there
        rss.append(proc.memory_info().rss)
        if drop:
            real(*args)
    c._drop_pages = hook
    base = proc.memory_info().rss
    c.convert([src], out, trust_pickle=True, shard_rows=1 << 17, progress=False, echo=lambda *a: None)
    print((max(rss) - base) / 2**20)
""")


def test_convert_streams_a_big_file_in_bounded_memory(tmp_path):
    official_file(tmp_path / "chunk_0.pt", E=2000, L=501, tensordict=False)  # 128 MB
    size = (tmp_path / "chunk_0.pt").stat().st_size / 2**20
    growth = {}
    for drop in (0, 1):
        args = [sys.executable, "-c", CONVERT_PROBE, str(tmp_path / "chunk_0.pt"),
                str(tmp_path / f"out{drop}"), str(drop)]
        out = subprocess.run(args, capture_output=True, text=True, check=True)
        growth[drop] = float(out.stdout.strip().splitlines()[-1])
    assert EpisodeDataset(tmp_path / "out1").num_transitions == 2000 * 500
    # without giving pages back, the mapped file piles up in RSS; with it, a few 16 MB chunks are resident
    assert growth[0] > 0.8 * size, f"probe too weak: {growth}"
    assert growth[1] < 0.5 * size, f"converting a {size:.0f} MB file grew RSS by {growth[1]:.0f} MB"
