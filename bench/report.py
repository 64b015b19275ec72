"""Episode records -> report.json (rows per runtime x precision x task, summary per runtime x precision),
report.md, latency and score plots; and `compare` of two reports."""
import io
import json
from pathlib import Path

import numpy as np

from edge_tdmpc.bench.meters import MIB, deadline_misses, latency_stats
from edge_tdmpc.files import atomic_write, atomic_write_text

REFERENCE = ("torch", "fp32")


def _stats(recs, hz, size_bytes) -> dict:
    ms = [x for r in recs for x in r["latency_ms"]]
    steps = sum(r["steps"] for r in recs)
    busy = sum(r["agent_s"] + r["env_s"] for r in recs)
    device = [r["peak_device_mib"] for r in recs if r.get("peak_device_mib") is not None]
    ticks = [r["control"] for r in recs if r.get("control")]
    return {
        "nonfinite_obs": sum(r.get("nonfinite_obs", 0) for r in recs),  # steps the runtime met NaN/Inf in
        # with a fixed-rate loop (`--realtime`): the share of ticks that took the fallback, not a fresh plan
        "fallback_rate": sum(t["fallback"] for t in ticks) / sum(t["ticks"] for t in ticks) if ticks else None,
        "latency_ms": latency_stats(ms),
        "deadline": deadline_misses(ms, hz),
        "env_step_ms": 1000 * sum(r["env_s"] for r in recs) / max(steps, 1),
        "throughput_steps_per_s": steps / busy if busy else None,
        "peak_rss_mib": max(r["peak_rss_mib"] for r in recs),
        "peak_device_mib": max(device) if device else None,
        "size_bytes": size_bytes,
        "size_mib": size_bytes / MIB if size_bytes is not None else None,
        "steps": steps,
    }


def build_report(records: list[dict], pairs, tasks, sizes: dict, meta: dict, check=None, hz=None) -> dict:
    """Rows for every (runtime, precision, task) with episodes, in request order; summaries per pair."""
    groups: dict[tuple, list] = {}
    for r in sorted(records, key=lambda r: r["episode"]):
        groups.setdefault((r["runtime"], r["precision"], r["task"]), []).append(r)
    rows = []
    for pair in pairs:
        for task in tasks:
            recs = groups.get((*pair, task))
            if not recs:
                continue
            returns = [r["return"] for r in recs]
            loads = [r["load_avg"] for r in recs if r.get("load_avg") is not None]
            rows.append({"runtime": pair[0], "precision": pair[1], "task": task, "episodes": len(recs),
                         "returns": returns, "score": float(np.mean(returns)) / 10,
                         **_stats(recs, hz, sizes.get(pair)), "load_avg": float(np.mean(loads)) if loads else None})
    ref = REFERENCE if REFERENCE in pairs else next((p for p in pairs if p[1] == "fp32"), None)
    checks = {(c["runtime"], c["precision"]): c for c in check or []}
    summary = {}
    for pair in pairs:
        prows = [row for row in rows if (row["runtime"], row["precision"]) == pair]
        if not prows:
            continue
        recs = [r for task in tasks for r in groups.get((*pair, task), [])]
        c = checks.get(pair)
        summary[pair] = {
            "runtime": pair[0], "precision": pair[1], "tasks": len(prows), "complete": len(prows) == len(tasks),
            "score": float(np.mean([row["score"] for row in prows])), **_stats(recs, hz, sizes.get(pair)),
            "reference": None, "delta": None,
            "check_actions": {k: c[k] for k in ("n", "max_abs", "median_abs", "tolerance", "ok")} if c else None,
        }
    if ref in summary:
        ref_scores = {row["task"]: row["score"] for row in rows if (row["runtime"], row["precision"]) == ref}
        for pair, s in summary.items():
            s["reference"] = "/".join(ref)
            if pair == ref:
                continue
            diffs = [row["score"] - ref_scores[row["task"]] for row in rows
                     if (row["runtime"], row["precision"]) == pair and row["task"] in ref_scores]
            lat, ref_lat = s["latency_ms"], summary[ref]["latency_ms"]
            # score on the tasks both have; latency as a ratio (< 1 is faster)
            s["delta"] = {"score": float(np.mean(diffs)) if diffs else None,
                          "latency_p50_ratio": lat["p50"] / ref_lat["p50"],
                          "latency_p99_ratio": lat["p99"] / ref_lat["p99"]}
    return {**meta, "rows": rows, "summary": list(summary.values()), "check_actions": check}


# --- markdown -----------------------------------------------------------------------------------------
def _f(x, fmt=".2f", none="–"):
    return none if x is None else format(x, fmt)


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def render_markdown(report: dict) -> str:
    env, st, model = report["environment"], report["settings"], report["model"]
    gpu = f", GPU {env['gpu']} (CUDA {env['cuda']})" if env.get("gpu") else ", no GPU"
    planner = st["planner"]
    protocol = (f"MPPI planning ({planner['iterations']} iterations x {planner['num_samples']} samples, "
                f"horizon {planner['horizon']})" if planner["mpc"] else "policy prior only (mpc=False)")
    out = io.StringIO()
    w = out.write
    w(f"# edge-tdmpc bench: {Path(model['path']).name if model.get('path') else 'in-memory model'}\n\n")
    w(f"- command: `{report.get('command') or '(python API)'}`\n")
    w(f"- model: {model.get('path') or 'in-memory'} (sha256 {model['sha256'][:12]}, {model['kind']})\n")
    w(f"- machine: {env['cpu']}, {env['cores_logical']} logical cores, {env['ram_gib']} GiB RAM{gpu}; "
      f"torch {env['torch']}, onnxruntime {env['onnxruntime'] or '–'}, TensorRT {env['tensorrt'] or '–'}; "
      f"{env['os']}\n")
    w(f"- protocol: {protocol}; {'eval-mode' if st['eval_mode'] else 'stochastic (official evaluate.py)'} "
      f"actions; {st['steps']} steps per episode; {st['episodes']} episode(s) per task; seed {st['seed']}; "
      f"{st['workers']} worker(s) x 1 torch thread; {st['warmup']} warm-up action(s) excluded\n")
    loads = [r["load_avg"] for r in report["rows"] if r.get("load_avg") is not None]
    load, when = (np.mean(loads), "mean over the episodes") if loads else (env.get("load_avg_1m"), "at the end")
    if load is not None:
        busy = "; above the core count, other processes shared the CPU and inflate latencies"
        w(f"- machine load: 1-min load average {load:.1f} ({when}) on {env['cores_logical']} cores"
          f"{busy if load > env['cores_logical'] else ''}\n")
    w(f"- created: {report['created']}\n\n")
    if report["summary"]:
        w(_summary_md(report))
    if report.get("check_actions"):
        w("## Faithfulness: same observations and noise as fp32 eager\n\n")
        w("Per step, max over action dims of |a - a_fp32|; the tolerance bounds the median (top-k/argmax "
          "choices inside MPPI can flip on last-bit differences, which the max shows).\n\n")
        w(_table(["runtime", "precision", "steps", r"max \|Δa\|", r"median \|Δa\|", r"mean \|Δa\|", "tolerance",
                  "ok", "act ms (median)"],
                 [[c["runtime"], c["precision"], c["n"], _f(c["max_abs"], ".2g"), _f(c["median_abs"], ".2g"),
                   _f(c["mean_abs"], ".2g"), _f(c["tolerance"], "g"), {True: "yes", False: "NO"}.get(c["ok"], "–"),
                   _f(c["act_ms_median"], ".1f")] for c in report["check_actions"]]) + "\n")
    if report["rows"]:
        w("## Per task\n\n")
        w(_table(["task", "runtime", "precision", "score", "returns", "p50 ms", "p99 ms", "max ms", "env ms/step",
                  "peak RSS MiB"],
                 [[r["task"], r["runtime"], r["precision"], _f(r["score"]),
                   ", ".join(f"{x:.1f}" for x in r["returns"]), _f(r["latency_ms"]["p50"], ".1f"),
                   _f(r["latency_ms"]["p99"], ".1f"), _f(r["latency_ms"]["max"], ".1f"), _f(r["env_step_ms"], ".2f"),
                   _f(r["peak_rss_mib"], ".0f")] for r in report["rows"]]))
    if report.get("plots"):
        w("\n" + "".join(f"![{Path(p).stem}]({p})\n" for p in report["plots"]))
    return out.getvalue()


def _summary_md(report: dict) -> str:
    env, hz = report["environment"], report["settings"].get("hz")
    realtime = (report["settings"].get("control") or {}).get("hz")
    text = "## Summary per runtime x precision\n\n"
    text += "Score = mean over tasks of (mean return / 10). Latency: wall clock around `act` per action."
    if realtime:
        text += (f" Fixed-rate loop at {realtime:g} Hz (`--realtime`): latency is per planning step, and a tick"
                 " that no fresh plan reached took the fallback.")
    if report["summary"][0].get("reference"):
        text += f" Δ against {report['summary'][0]['reference']} (latency as a ratio, < 1 is faster)."
    header = ["runtime", "precision", "tasks", "score", "Δ score", "p50 ms", "p99 ms", "max ms", "p50 ratio",
              *([f"missed @ {hz:g} Hz"] if hz else []), *(["fallback ticks"] if realtime else []), "env ms/step",
              "steps/s", "peak RSS MiB",
              *(["peak GPU MiB"] if env.get("gpu") else []), "size MiB"]
    rows = []
    for s in report["summary"]:
        d, lat = s["delta"] or {}, s["latency_ms"]
        rows.append([s["runtime"], s["precision"], s["tasks"], _f(s["score"]), _f(d.get("score"), "+.2f"),
                     _f(lat["p50"], ".1f"), _f(lat["p99"], ".1f"), _f(lat["max"], ".1f"),
                     _f(d.get("latency_p50_ratio"), ".2f"),
                     *([f"{s['deadline']['rate']:.1%}"] if hz else []),
                     *([f"{s['fallback_rate']:.1%}"] if realtime else []), _f(s["env_step_ms"], ".2f"),
                     _f(s["throughput_steps_per_s"], ".1f"), _f(s["peak_rss_mib"], ".0f"),
                     *([_f(s["peak_device_mib"], ".0f")] if env.get("gpu") else []), _f(s["size_mib"], ".2f")])
    bad = [s for s in report["summary"] if s.get("nonfinite_obs")]
    if bad:
        text += ("\n\n**Warning: non-finite observations.** " + "; ".join(
            f"{s['runtime']}/{s['precision']}: {s['nonfinite_obs']} step(s)" for s in bad) +
            " had a NaN or Inf observation; each got the runtime's safe action (the last action held, zeros "
            "before the first) instead of a plan. Their returns are not the model's.")
    return text + "\n\n" + _table(header, rows) + "\n"


# --- plots --------------------------------------------------------------------------------------------
def plot(report: dict, records: list[dict], out: Path) -> list[str]:
    """latency.png (histogram and CDF per runtime x precision), scores.png (per-task score per pair)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [(s["runtime"], s["precision"]) for s in report["summary"]]
    tasks = list(dict.fromkeys(r["task"] for r in report["rows"]))
    if not pairs:
        return []
    fig, (hist, cdf) = plt.subplots(1, 2, figsize=(11, 4))
    for rt, prec in pairs:
        ms = np.sort([x for r in records if (r["runtime"], r["precision"]) == (rt, prec) for x in r["latency_ms"]])
        bins = np.geomspace(max(ms.min(), 1e-3), ms.max() * 1.01, 60) if ms.size else 10
        hist.hist(ms, bins=bins, histtype="step", label=f"{rt}/{prec}")
        cdf.plot(ms, np.arange(1, ms.size + 1) / ms.size, label=f"{rt}/{prec}")
    for ax in (hist, cdf):
        ax.set_xscale("log")
        ax.set_xlabel("latency per action (ms)")
    hist.set_ylabel("actions")
    cdf.set_ylabel("fraction of actions")
    if report["settings"].get("hz"):
        cdf.axvline(1000 / report["settings"]["hz"], color="k", ls=":", label=f"{report['settings']['hz']:g} Hz")
    cdf.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "latency.png")

    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(tasks) * max(1, len(pairs)) ** 0.5 + 2), 4.5))
    width = 0.8 / len(pairs)
    for i, (rt, prec) in enumerate(pairs):
        scores = {r["task"]: r["score"] for r in report["rows"] if (r["runtime"], r["precision"]) == (rt, prec)}
        ax.bar(np.arange(len(tasks)) + i * width, [scores.get(t, 0) for t in tasks], width, label=f"{rt}/{prec}")
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("score (mean return / 10)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "scores.png")
    plt.close("all")
    return ["latency.png", "scores.png"]


def save_figure(fig, path):
    """fig into `path`, never half-written; the format follows the suffix (PNG without one)."""
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=110))


def write_reports(report: dict, records: list[dict], out: Path) -> dict:
    out = Path(out)
    report["plots"] = plot(report, records, out)
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    atomic_write_text(out / "report.md", render_markdown(report))
    return report


# --- compare ------------------------------------------------------------------------------------------
def load_report(path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read bench report {path} ({e}); pass a report.json written by edge-tdmpc bench"
                         ) from None
    if not {"rows", "summary"} <= set(report):
        raise ValueError(f"{path} is not an edge-tdmpc bench report (no 'rows'/'summary')")
    return report


def compare(a: dict, b: dict, names=("A", "B")) -> str:
    """B against A: score differences and latency / memory ratios per runtime x precision, then per task."""
    A, B = names
    key = lambda r: (r["runtime"], r["precision"])  # noqa: E731
    sa, sb = {key(s): s for s in a["summary"]}, {key(s): s for s in b["summary"]}
    rows = []
    for k in dict.fromkeys([*sa, *sb]):
        x, y = sa.get(k), sb.get(k)
        if x is None or y is None:
            rows.append(["/".join(k), _f(x and x["score"]), _f(y and y["score"]), "only in " + (A if x else B),
                         "", "", "", ""])
            continue
        rows.append(["/".join(k), _f(x["score"]), _f(y["score"]), _f(y["score"] - x["score"], "+.2f"),
                     f"{_f(x['latency_ms']['p50'], '.1f')} -> {_f(y['latency_ms']['p50'], '.1f')}",
                     _f(y["latency_ms"]["p50"] / x["latency_ms"]["p50"], ".3g") + "x",
                     f"{_f(x['latency_ms']['p99'], '.1f')} -> {_f(y['latency_ms']['p99'], '.1f')}",
                     f"{_f(x['peak_rss_mib'], '.0f')} -> {_f(y['peak_rss_mib'], '.0f')}"])
    sa_, sb_ = a.get("settings", {}), b.get("settings", {})
    differ = [k for k in ("planner", "steps", "eval_mode", "seed") if sa_.get(k) != sb_.get(k)]
    note = f"note: the runs differ in {', '.join(differ)}; score differences are not precision effects\n" \
        if differ else ""
    text = note + f"summary ({A} -> {B})\n" + _table(
        ["runtime/precision", f"score {A}", f"score {B}", "Δ score", "p50 ms", "p50 ratio", "p99 ms", "peak RSS MiB"],
        rows)
    ra = {(*key(r), r["task"]): r for r in a["rows"]}
    rb = {(*key(r), r["task"]): r for r in b["rows"]}
    common = [k for k in ra if k in rb]
    if common:
        text += "\nper task (both reports)\n" + _table(
            ["task", "runtime/precision", f"score {A}", f"score {B}", "Δ score", "p50 ratio"],
            [[k[2], f"{k[0]}/{k[1]}", _f(ra[k]["score"]), _f(rb[k]["score"]),
              _f(rb[k]["score"] - ra[k]["score"], "+.2f"),
              _f(rb[k]["latency_ms"]["p50"] / ra[k]["latency_ms"]["p50"], ".3g") + "x"] for k in common])
    return text
