"""benchmarks.seeds: the demo under several seed sets, checked against its claims."""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks import seeds

ROOT = Path(__file__).resolve().parents[1]
DEMO_METRICS = json.loads((ROOT / "outputs" / "evaluate" / "metrics.json").read_text())


def metrics_with(precision: float, recall: float, colour: float, shape: float, r1: tuple, cider: tuple) -> dict:
    """The committed demo's ``metrics.json`` (its layout) with the values the claims read set as given."""
    m = copy.deepcopy(DEMO_METRICS)
    f = m["filter"]
    f["precision"], f["recall"] = precision, recall
    f["wrong_attribute"]["by_detail"]["color"]["recall"] = colour
    f["wrong_attribute"]["by_detail"]["shape"]["recall"] = shape
    for name, r, c in zip(("noisy", "capfilt"), r1, cider, strict=True):
        m["models"][name]["mean_r1"], m["models"][name]["cider"] = r, c
    return m


def test_seed_set_adds_its_offset_to_every_training_and_capfilt_seed():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    same = seeds.seeded_params(params, 0)
    two = seeds.seeded_params(params, 2)
    for section in seeds.SEEDED_SECTIONS:
        base = 0 if section == "capfilt" else 42  # the defaults of blip_core.config
        assert same[section]["seed"] == base and two[section]["seed"] == base + 2
    # nothing else changes: data sources (and their toy-web seeds) stay the same
    assert {k: v for k, v in two.items() if k not in seeds.SEEDED_SECTIONS} == \
        {k: v for k, v in params.items() if k not in seeds.SEEDED_SECTIONS}
    assert "seed" not in params["pretrain"]  # the input is not modified
    explicit = seeds.seeded_params({"pretrain": {"seed": 7}}, 1)
    assert explicit["pretrain"]["seed"] == 8 and explicit["capfilt"]["seed"] == 1
    with pytest.raises(seeds.SeedsError, match="pretrain.seed is not an integer"):
        seeds.seeded_params({"pretrain": {"seed": "x"}}, 1)


def test_the_defaults_it_assumes_are_the_configs():
    from blip_core.config import load_config

    cfg = load_config(None, [])
    assert cfg.capfilt.seed == seeds.DEFAULT_SEEDS["capfilt"]
    for section in ("pretrain", "finetune_captioner", "finetune_filter", "finetune_vqa"):
        assert getattr(cfg, section).seed == seeds.DEFAULT_TRAIN_SEED, section


def test_summary_names_the_missed_claims():
    run = metrics_with(0.87, 0.805, 1.0, 0.112, (27.7, 42.3), (183.7, 205.7))
    other = copy.deepcopy(run)
    other["filter"]["precision"] = 0.95
    other["filter"]["wrong_attribute"]["by_detail"]["shape"]["recall"] = 0.6
    other["models"]["capfilt"]["mean_r1"] = other["models"]["noisy"]["mean_r1"] + 3.0
    table, all_hold = seeds.summarise({0: run, 1: other})
    rows = table.splitlines()
    assert not all_hold and len(rows) == 5  # header, rule, 2 seed sets, mean +/- sd
    assert rows[0].startswith("| seed set | filter precision (>= 0.900) |") and "CIDEr gain (> +0.0)" in rows[0]
    # precision 0.870 and wrong-shape recall 0.112 miss; the R@1 and CIDEr gains hold
    assert "| 0.870 (missed) |" in rows[2] and "0.112 (missed)" in rows[2] and "+14.6 |" in rows[2]
    assert rows[2].endswith("| no |") and rows[3].endswith("| no |") and "+3.0 (missed)" in rows[3]
    assert rows[4].startswith("| mean +/- sd | 0.910 +/- 0.057 |") and rows[4].endswith("| 0 of 2 |")
    fine = copy.deepcopy(other)
    fine["models"]["capfilt"]["mean_r1"] += 10
    fine["filter"]["wrong_attribute"]["by_detail"]["color"]["recall"] = 0.5  # the bound itself holds
    assert seeds.summarise({3: fine})[1] is True


def test_bad_input_is_one_line(tmp_path, capsys):
    assert seeds.main(["--seeds", "0", "--workdir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "benchmarks.seeds: error: --seeds must be >= 1, got 0"
    assert seeds.main(["--params", str(tmp_path / "nope.yaml"), "--workdir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().startswith("benchmarks.seeds: error: not found:")
    (tmp_path / "list.yaml").write_text("- 1\n")
    assert seeds.main(["--params", str(tmp_path / "list.yaml"), "--workdir", str(tmp_path)]) == 2
    assert "not a YAML mapping" in capsys.readouterr().err


@pytest.mark.slow
def test_one_seed_set_runs_the_whole_demo_with_dvc_and_resumes(tmp_path, monkeypatch, capsys):
    """The tiny configuration through the real dvc.yaml, as seed set 0 of 1; a second call reuses it."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for var in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
        monkeypatch.setenv(var, "t")
    for var in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(var, "t@t")
    params = tmp_path / "params_tiny.yaml"
    shutil.copy(ROOT / "tests" / "assets" / "params_tiny.yaml", params)
    work = tmp_path / "seeds"
    rc = seeds.main(["--seeds", "1", "--params", str(params), "--workdir", str(work)])
    out = capsys.readouterr().out
    assert rc in (0, 1)  # the tiny models need not meet the demo's claims; the study must run and report
    d = work / "seed-0"
    ran = yaml.safe_load((d / "params.yaml").read_text())
    assert ran["pretrain"]["seed"] == 42 and ran["capfilt"]["seed"] == 0
    metrics = json.loads((d / "outputs" / "evaluate" / "metrics.json").read_text())
    assert json.loads((work / "seeds.json").read_text()) == {"0": metrics}
    assert (work / "seeds.md").read_text().strip() == out.strip() and out.count("\n| 0 |") == 1
    log = (d / "repro.log").read_text()
    assert "Running stage 'repretrain'" in log
    before = len(log)
    assert seeds.main(["--seeds", "1", "--params", str(params), "--workdir", str(work)]) == rc
    assert "Running stage" not in (d / "repro.log").read_text()[before:]  # every stage was up to date
