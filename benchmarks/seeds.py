"""The demo's result under several seed sets: ``python -m benchmarks.seeds --seeds 3``.

Seed set ``i`` adds ``i`` to every seed the demo's training and CapFilt use (``pretrain.seed``, which
re-pre-training shares, ``finetune_captioner.seed``, ``finetune_filter.seed``, ``finetune_vqa.seed`` and
``capfilt.seed``); set 0 is ``params.yaml`` as given. The data (the toy-web sources and their seeds) stay
the same, so the sets differ only in initialisation, batch order, dropout and CapFilt's sampling.

Each set runs the whole demo with ``dvc repro`` in its own directory under ``--workdir`` (a git + DVC
repository holding ``dvc.yaml`` and the seeded ``params.yaml``, with its own MLflow store
``mlflow.db``), its output in ``repro.log`` there. A set that already finished is not run again (DVC finds
every stage up to date), so an interrupted study resumes. Then each set's
``outputs/evaluate/metrics.json`` is checked against the demo's claims:

- the filter's precision >= 0.9 and recall >= 0.8 on the known web noise;
- its recall >= 0.5 on wrong-colour captions, and separately on wrong-shape captions;
- the re-pre-trained model's mean R@1 >= the noisy model's + 5 points;
- its CIDEr higher than the noisy model's.

Prints one markdown table (a row per seed set, then mean +/- sd) and writes it with the numbers to
``seeds.md`` and ``seeds.json`` in ``--workdir``. Exits 1 when a set misses a claim, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SEEDED_SECTIONS = ("pretrain", "finetune_captioner", "finetune_filter", "finetune_vqa", "capfilt")
DEFAULT_SEEDS = {"capfilt": 0}  # blip_core.config: CapFiltConfig.seed; the training sections default to 42
DEFAULT_TRAIN_SEED = 42
METRICS = "outputs/evaluate/metrics.json"


@dataclass(frozen=True)
class Claim:
    """One of the demo's claims: a value read from ``metrics.json`` and the bound it must meet."""

    name: str
    value: Callable[[dict], float]
    bound: float
    strict: bool = False  # value > bound instead of >=
    fmt: str = "{:.3f}"

    def holds(self, metrics: dict) -> bool:
        v = self.value(metrics)
        return v > self.bound if self.strict else v >= self.bound

    @property
    def label(self) -> str:
        return f"{self.name} ({'>' if self.strict else '>='} {self.fmt.format(self.bound)})"


def _get(m: dict, path: str) -> float:
    for key in path.split("."):
        m = m[key]
    return float(m)  # type: ignore[arg-type]


CLAIMS = (
    Claim("filter precision", lambda m: _get(m, "filter.precision"), 0.9),
    Claim("filter recall", lambda m: _get(m, "filter.recall"), 0.8),
    Claim("wrong-colour recall", lambda m: _get(m, "filter.wrong_attribute.by_detail.color.recall"), 0.5),
    Claim("wrong-shape recall", lambda m: _get(m, "filter.wrong_attribute.by_detail.shape.recall"), 0.5),
    Claim("mean R@1 gain", lambda m: _get(m, "models.capfilt.mean_r1") - _get(m, "models.noisy.mean_r1"), 5.0,
          fmt="{:+.1f}"),
    Claim("CIDEr gain", lambda m: _get(m, "models.capfilt.cider") - _get(m, "models.noisy.cider"), 0.0,
          strict=True, fmt="{:+.1f}"),
)
# shown beside the claims
CONTEXT = (
    ("noisy mean R@1", "models.noisy.mean_r1", "{:.1f}"),
    ("CapFilt mean R@1", "models.capfilt.mean_r1", "{:.1f}"),
    ("noisy CIDEr", "models.noisy.cider", "{:.1f}"),
    ("CapFilt CIDEr", "models.capfilt.cider", "{:.1f}"),
)


class SeedsError(Exception):
    """A user-facing failure: printed as one line."""


def seeded_params(params: dict, offset: int) -> dict:
    """``params`` (a parsed params.yaml) with ``offset`` added to the seed of every seeded section."""
    out = json.loads(json.dumps(params))  # a deep copy of plain YAML data
    for section in SEEDED_SECTIONS:
        body = out.setdefault(section, {})
        if not isinstance(body, dict):
            raise SeedsError(f"params: {section} is not a mapping")
        base = body.get("seed", DEFAULT_SEEDS.get(section, DEFAULT_TRAIN_SEED))
        if not isinstance(base, int) or isinstance(base, bool):
            raise SeedsError(f"params: {section}.seed is not an integer: {base!r}")
        body["seed"] = base + offset
    return out


def _git_dvc_repo(d: Path, env: dict) -> None:
    if (d / ".dvc").is_dir():
        return
    d.mkdir(parents=True, exist_ok=True)
    for args in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"]):
        subprocess.run(args, cwd=d, env=env, check=True, capture_output=True)
    (d / ".gitignore").write_text("mlflow.db\nmlruns/\nrepro.log\n")


def run_seed(offset: int, params: dict, dvc_yaml: Path, workdir: Path) -> dict:
    """Run (or resume) the demo for seed set ``offset`` in ``workdir/seed-<offset>``; returns its metrics."""
    d = workdir / f"seed-{offset}"
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{d / 'mlflow.db'}"}
    for var in ("BLIP_PARENT_RUN_ID", "BLIP_TRACKING"):
        env.pop(var, None)
    _git_dvc_repo(d, env)
    shutil.copyfile(dvc_yaml, d / "dvc.yaml")
    (d / "params.yaml").write_text(yaml.safe_dump(seeded_params(params, offset), sort_keys=False))
    log = d / "repro.log"
    t0 = time.perf_counter()
    print(f"seed set {offset}: dvc repro in {d} (output in {log})", file=sys.stderr, flush=True)
    with open(log, "a", encoding="utf-8") as f:
        rc = subprocess.run(["dvc", "repro"], cwd=d, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SeedsError(f"seed set {offset}: dvc repro failed (exit {rc}); see {log}")
    print(f"seed set {offset}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return json.loads((d / METRICS).read_text())


def _mean_sd(values: Sequence[float], fmt: str) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.fmean(values))} +/- {fmt.format(sd).lstrip('+')}"


def summarise(results: dict[int, dict]) -> tuple[str, bool]:
    """A markdown table of the claims (and context) per seed set, with mean +/- sd; and whether all hold."""
    cols = [c.label for c in CLAIMS]
    cols += [name for name, _, _ in CONTEXT]
    lines = ["| seed set | " + " | ".join(cols) + " | all claims |", "|---" * (len(cols) + 2) + "|"]
    all_hold = True
    for offset, m in sorted(results.items()):
        cells = [c.fmt.format(c.value(m)) + ("" if c.holds(m) else " (missed)") for c in CLAIMS]
        cells += [fmt.format(_get(m, path)) for _, path, fmt in CONTEXT]
        ok = all(c.holds(m) for c in CLAIMS)
        all_hold &= ok
        lines.append(f"| {offset} | " + " | ".join(cells) + f" | {'yes' if ok else 'no'} |")
    ms = list(results.values())
    cells = [_mean_sd([c.value(m) for m in ms], c.fmt) for c in CLAIMS]
    cells += [_mean_sd([_get(m, path) for m in ms], fmt) for _, path, fmt in CONTEXT]
    held = sum(all(c.holds(m) for c in CLAIMS) for m in ms)
    lines.append("| mean +/- sd | " + " | ".join(cells) + f" | {held} of {len(ms)} |")
    return "\n".join(lines), all_hold


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.seeds", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="number of seed sets (0 .. N-1)")
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="the demo configuration")
    p.add_argument("--dvc-yaml", type=Path, default=ROOT / "dvc.yaml")
    p.add_argument("--workdir", type=Path, default=ROOT / "outputs" / "seeds",
                   help="one directory per seed set is made here; a finished set is reused")
    args = p.parse_args(argv)
    try:
        if args.seeds < 1:
            raise SeedsError(f"--seeds must be >= 1, got {args.seeds}")
        for path in (args.params, args.dvc_yaml):
            if not path.is_file():
                raise SeedsError(f"not found: {path}")
        params = yaml.safe_load(args.params.read_text())
        if not isinstance(params, dict):
            raise SeedsError(f"{args.params}: not a YAML mapping")
        results = {i: run_seed(i, params, args.dvc_yaml.resolve(), args.workdir.resolve()) for i in range(args.seeds)}
        table, all_hold = summarise(results)
    except SeedsError as e:
        print(f"benchmarks.seeds: error: {e}", file=sys.stderr)
        return 2
    except (KeyError, TypeError, ValueError) as e:
        print(f"benchmarks.seeds: error: a metrics.json lacks a value the claims need: {e!r}", file=sys.stderr)
        return 2
    (args.workdir / "seeds.md").write_text(table + "\n")
    (args.workdir / "seeds.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1) + "\n")
    print(table)
    return 0 if all_hold else 1


if __name__ == "__main__":
    raise SystemExit(main())
