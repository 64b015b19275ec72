import re
import shutil
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from edge_tdmpc.cli import main


def test_console_script_help():
    exe = shutil.which("edge-tdmpc", path=str(Path(sys.executable).parent))
    assert exe, "the edge-tdmpc console script is installed with the package"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("inspect", "eval"):
        assert cmd in out



def test_bench_benchmarks_are_subcommands():
    """`bench step-latency | train-speed | wallclock` route to their own commands, not to `bench run MODEL`."""
    runner = CliRunner()
    out = runner.invoke(main, ["bench", "--help"]).output
    for cmd, option in (("step-latency", "--own-noise"), ("train-speed", "--rss-gb"), ("wallclock", "--fallback")):
        assert cmd in out
        res = runner.invoke(main, ["bench", cmd, "--help"])
        assert res.exit_code == 0 and option in res.output, res.output

def test_inspect_reports_the_student(checkpoint_path):
    res = CliRunner().invoke(main, ["inspect", str(checkpoint_path)])
    assert res.exit_code == 0, res.output
    assert "1M" in res.output and "30 tasks" in res.output
    assert "1,426,427 trainable" in res.output and "1,980,357 stored" in res.output
    assert "float16" in res.output
    size = checkpoint_path.stat().st_size
    assert f"{size:,}" in res.output
    assert re.search(r"_dynamics\s+287,616", res.output)


def test_eval_prints_per_task_score(checkpoint_path):
    res = CliRunner().invoke(main, ["eval", str(checkpoint_path), "--tasks", "cartpole-balance",
                                    "--episodes", "1", "--steps", "10", "--eval-mode"])
    assert res.exit_code == 0, res.output
    m = re.search(r"cartpole-balance\s+return\s+([\d.]+)\s+score\s+([\d.]+)", res.output)
    assert m and float(m.group(1)) > 5  # 10 steps of an upright pole, reward up to 2 per agent step
    assert abs(float(m.group(2)) - float(m.group(1)) / 10) < 0.01


def test_bad_inputs_are_one_line_errors(checkpoint_path, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["eval", str(checkpoint_path), "--tasks", "cartpole-swingupp"])
    assert res.exit_code == 2 and "did you mean cartpole-swingup" in res.output
    assert len(res.output.strip().splitlines()) == 1
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    res = runner.invoke(main, ["inspect", str(bad)])
    assert res.exit_code == 2 and "corrupt or truncated" in res.output
