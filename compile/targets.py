"""Device profiles (targets/*.json): compute capability, memory, DLA, JetPack -> TensorRT, precisions."""
import difflib
import json
from importlib import resources


def _profiles() -> dict[str, dict]:
    out = {}
    for f in resources.files("edge_tdmpc.targets").iterdir():
        if f.name.endswith(".json"):
            p = json.loads(f.read_text())
            out[p["name"]] = p
    return out


def list_targets() -> list[dict]:
    return sorted(_profiles().values(), key=lambda p: (p["family"] != "jetson", p["name"]))


def load_target(name: str) -> dict:
    """A profile by name or alias ('jetson' -> the Orin Nano profile: what builds there runs on every Orin)."""
    profiles = _profiles()
    for p in profiles.values():
        if name == p["name"] or name in p.get("aliases", []):
            return p
    names = sorted(set(profiles) | {a for p in profiles.values() for a in p.get("aliases", [])})
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "see `edge-tdmpc targets`"
    raise ValueError(f"unknown target '{name}': {hint}")


def min_tensorrt(target: dict) -> tuple[int, ...] | None:
    """The oldest TensorRT the profile's JetPacks ship (None: not fixed by the profile, e.g. an x86 dGPU)."""
    versions = [tuple(int(x) for x in v["tensorrt"].split(".")) for v in (target.get("jetpack") or {}).values()]
    return min(versions) if versions else None


def check_precision(target: dict, precision: str):
    if precision not in target["precisions"]:
        raise ValueError(f"target '{target['name']}' ({target['description']}) does not support {precision}: "
                         f"choose from {target['precisions']}")


def summary_rows() -> list[str]:
    rows = [f"{'target':<11} {'family':<7} {'arch / sm':<16} {'memory':>7} {'DLA':>3}  {'JetPack -> TensorRT':<31} "
            f"precisions"]
    for p in list_targets():
        gpu = p.get("gpu") or {}
        arch = f"{gpu.get('architecture', '-')} {gpu.get('compute_capability', '')}".strip() if gpu else "-"
        mem = f"{p['memory_gb']} GB" if p.get("memory_gb") else "-"
        jp = ", ".join(f"{k}->{v['tensorrt']}" for k, v in (p.get("jetpack") or {}).items()) or "-"
        rows.append(f"{p['name']:<11} {p['family']:<7} {arch:<16} {mem:>7} {p.get('dla_cores', 0):>3}  {jp:<37} "
                    f"{','.join(p['precisions'])}")
    return rows
