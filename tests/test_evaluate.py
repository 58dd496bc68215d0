"""Evaluate stage: tiny models on a tiny toy-web test split; metrics.json, reports, filter scoring, MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from blip_core import build_model, model_preset, save_model_dir
from blip_core.config import load_config
from blip_core.errors import UserError
from blip_core.eval.captions import caption_scores, caption_tokens, grammar_match
from blip_core.eval.filter import capfilt_metrics, filter_metrics, itc_filter_metrics
from blip_core.tokenizer import BlipTokenizer
from components import cli, evaluate, ingest, storage, training
from components.eval_report import decoding_note, render_markdown, threshold_note

CFG = ["model.preset=tiny", "evaluate.k_test=4", "evaluate.batch_size=8", "evaluate.itm_batch_size=16",
       "evaluate.log_samples=2"]
RETRIEVAL_KEYS = ["tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "tr_mean", "ir_mean", "r_mean", "mean_r1"]


@pytest.fixture
def no_tracking(monkeypatch):
    monkeypatch.setenv("BLIP_TRACKING", "0")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest single-threaded (conftest restores the thread count)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def test_split(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("eval-data") / "test")
    ingest.run(load_config(None, ["ingest.resolution=32"]), "toyweb://?split=test&n=12&seed=1&size=32", out,
               progress=False)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory, test_split) -> dict[str, str]:
    """Two tiny checkpoints (different seeds) with a tokenizer built from the test captions."""
    tok = BlipTokenizer.from_corpus(training.corpus_captions([test_split], 30), vocab_size=200)
    root = tmp_path_factory.mktemp("eval-models")
    out = {}
    for name, seed in (("noisy", 0), ("capfilt", 1)):
        torch.manual_seed(seed)
        model = build_model(model_preset("tiny"), vocab_size=len(tok))
        out[name] = str(save_model_dir(root / name, model, tok))
    return out


def _record(source, caption, kept, noise=None, score=0.5, key="k", detail=None):
    rec = {"image_id": key, "key": key, "source": source, "caption": caption,
           "itm_score": score if caption is not None else None, "kept": kept, "noise": noise}
    return {**rec, "noise_detail": detail} if detail else rec


def provenance() -> list[dict]:
    """Web: 6 clean (1 dropped), 4 unrelated (4 dropped), 3 boilerplate (3), 4 wrong attribute (2: the one
    wrong colour and one of three wrong shapes), 1 unreadable;
    synthetic: 4 (3 kept); human: 5 (all kept)."""
    recs = [_record("web", f"clean caption {i}", kept=i != 0) for i in range(6)]
    recs += [_record("web", f"unrelated {i}", kept=False, noise="unrelated") for i in range(4)]
    recs += [_record("web", f"IMG_{i}.jpg", kept=False, noise="boilerplate") for i in range(3)]
    recs += [_record("web", f"wrong {i}", kept=i >= 2, noise="wrong_attribute", detail="color" if i == 0 else "shape")
             for i in range(4)]
    recs.append(_record("web", None, kept=False))  # unreadable image: no filter decision
    recs += [_record("synthetic", c, kept=k) for c, k in
             (("a red circle", True), ("a red circle", True), ("a blue square", False), ("two green stars", True))]
    recs += [{**_record("human", f"a human caption {i}", kept=True), "itm_score": None} for i in range(5)]
    return recs


@pytest.fixture
def capfilt_dir(tmp_path) -> str:
    d = tmp_path / "capfilt"
    d.mkdir()
    (d / "provenance.jsonl").write_text("".join(json.dumps(r) + "\n" for r in provenance()))
    calibration = {"threshold": 0.1234, "target_precision": 0.9, "met": True, "precision": 0.95, "recall": 0.8,
                   "captions": 300, "wrong": 90, "dropped": 76, "data": ["data/calibration"]}
    (d / "summary.json").write_text(json.dumps({"threshold": 0.1234, "threshold_source": "calibration",
                                                "calibration": calibration}))
    return str(d)


# --------------------------------------------------------------------------------------------------
# Pure parts
# --------------------------------------------------------------------------------------------------


def test_filter_metrics_hand_worked():
    f = filter_metrics(provenance())
    assert (f["web_captions"], f["noisy"], f["noisy_dropped"], f["clean_dropped"]) == (17, 11, 9, 1)
    assert f["precision"] == pytest.approx(0.9)
    assert f["recall"] == pytest.approx(9 / 11)
    assert f["f1"] == pytest.approx(2 * 0.9 * (9 / 11) / (0.9 + 9 / 11))
    assert f["clean_drop_rate"] == pytest.approx(1 / 6)
    assert f["unrelated"] == {"count": 4, "dropped": 4, "precision": pytest.approx(0.8), "recall": 1.0,
                              "f1": pytest.approx(2 * 0.8 / 1.8)}
    assert f["boilerplate"]["precision"] == pytest.approx(0.75) and f["boilerplate"]["recall"] == 1.0
    assert f["wrong_attribute"]["precision"] == pytest.approx(2 / 3)
    assert f["wrong_attribute"]["recall"] == pytest.approx(0.5)
    by = f["wrong_attribute"]["by_detail"]
    assert (by["color"]["count"], by["color"]["recall"], by["color"]["precision"]) == (1, 1.0, 0.5)
    assert (by["shape"]["count"], by["shape"]["dropped"]) == (3, 1) and by["shape"]["recall"] == pytest.approx(1 / 3)
    assert "by_detail" not in f["unrelated"]


def test_filter_metrics_without_noise_labels_has_no_precision():
    f = filter_metrics([_record("web", "a caption", kept=True), _record("web", "b", kept=True)])
    assert f["noisy"] == 0 and "recall" not in f and "precision" not in f


def with_itc(records: list[dict]) -> list[dict]:
    """provenance() with ITC cosines: ranked high to low, clean 0 (0.9), shape 2 (0.85), clean 1 (0.8), shape 1
    (0.75), clean 2 (0.7), boilerplate 0 (0.65), clean 3 (0.6) | boilerplate 1 (0.55), clean 4 (0.5), colour
    (0.45), clean 5 (0.1), unrelated (0.06-0.0), boilerplate 2 (0.03), shape 3 (0.01)."""
    cos = {"clean caption": [0.9, 0.8, 0.7, 0.6, 0.5, 0.1], "unrelated": [0.0, 0.02, 0.04, 0.06],
           "IMG_": [0.65, 0.55, 0.03], "wrong": [0.45, 0.75, 0.85, 0.01]}
    out = []
    for r in records:
        prefix = next((k for k in cos if r["source"] == "web" and (r["caption"] or "").startswith(k)), None)
        out.append({**r, "itc_cosine": cos[prefix][int(r["caption"].split()[-1].removesuffix(".jpg").lstrip("IMG_"))]}
                   if prefix else r)
    return out


def test_itc_filter_metrics_hand_worked():
    """The ITM filter keeps 7 of the 17 scored web captions; the ITC filter keeps the 7 of highest cosine."""
    f = itc_filter_metrics(with_itc(provenance()))
    assert (f["itm_kept"], f["kept"], f["threshold"]) == (7, 7, pytest.approx(0.575))
    # dropped: clean 4, 5; unrelated x4; boilerplate 1, 2; colour; shape 3
    assert (f["dropped"], f["noisy_dropped"], f["clean_dropped"]) == (10, 8, 2)
    assert f["precision"] == pytest.approx(0.8) and f["recall"] == pytest.approx(8 / 11)
    assert f["unrelated"]["precision"] == pytest.approx(2 / 3) and f["unrelated"]["recall"] == 1.0
    assert f["boilerplate"]["precision"] == pytest.approx(0.5) and f["boilerplate"]["recall"] == pytest.approx(2 / 3)
    assert f["wrong_attribute"]["precision"] == pytest.approx(0.5) and f["wrong_attribute"]["recall"] == 0.5
    by = f["wrong_attribute"]["by_detail"]
    assert by["color"]["recall"] == 1.0 and by["color"]["precision"] == pytest.approx(1 / 3)
    assert by["shape"]["recall"] == pytest.approx(1 / 3) and by["shape"]["precision"] == pytest.approx(1 / 3)
    # The ITM filter's own numbers are unchanged by the cosines.
    assert filter_metrics(with_itc(provenance())) == filter_metrics(provenance())
    # Provenance without cosines (written before CapFilt recorded them): no baseline, and no report section.
    assert itc_filter_metrics(provenance()) == {}
    info = {"test": "t", "capfilt": "c", "images": 1, "texts": 1, "k_test": 1, "num_beams": 3, "min_length": 5,
            "max_length": 20, "prompt": "p"}
    metrics = {"models": {}, "filter": filter_metrics(provenance()), "capfilt": {}}
    md = render_markdown({**metrics, "filter_itc": f}, info)
    assert "the ITM filter kept 7; the ITC-cosine filter" in md and "keeps the 7 with the highest cosine" in md
    assert "| all noise | 11 | 0.900 | 0.818 | 0.800 | 0.727 |" in md
    assert "| wrong_attribute: color | 1 | 0.500 | 1.000 | 0.333 | 1.000 |" in md
    assert "ITC-cosine" not in render_markdown({**metrics, "filter_itc": {}}, info)


def test_capfilt_metrics_hand_worked():
    c = capfilt_metrics(provenance())
    assert c["texts_in"] == {"web": 17, "synthetic": 4, "human": 5}
    assert c["texts_kept"] == {"web": 7, "synthetic": 3, "human": 5}
    assert c["kept_share"]["web"] == pytest.approx(7 / 17)
    assert c["kept_share"]["synthetic"] == pytest.approx(0.75)
    assert c["kept_share"]["human"] == 1.0
    # synthetic: 12 words, 8 distinct; 8 bigrams, 6 distinct
    assert c["synthetic_distinct_1"] == pytest.approx(8 / 12)
    assert c["synthetic_distinct_2"] == pytest.approx(6 / 8)


def test_caption_scores_and_tokens():
    assert caption_tokens("A Red, circle!  (big)") == "a red circle big"
    perfect = caption_scores(["a red circle on a white background", "two blue squares side by side"],
                                      [["a red circle on a white background"], ["two blue squares side by side"]])
    assert perfect["bleu4"] == pytest.approx(100.0, abs=1e-3)
    wrong = caption_scores(["a cat", "a dog"], [["a red circle on a white background"],
                                                         ["two blue squares side by side"]])
    assert wrong["bleu4"] < 1.0 and wrong["cider"] < perfect["cider"]


def test_grammar_match_uses_the_scene():
    scene = {"background": "white", "texture": "plain", "objects": [
        {"shape": "circle", "color": "red", "size": "small", "x": 0.3, "y": 0.5, "radius": 0.08},
        {"shape": "square", "color": "blue", "size": "large", "x": 0.7, "y": 0.5, "radius": 0.14}]}
    samples = [{"scene": scene}, {"scene": scene}, {}]
    gm = grammar_match(["a red circle to the left of a blue square", "a red square", "anything"], samples)
    assert gm == pytest.approx(50.0)
    assert grammar_match(["x"], [{}]) is None


def test_parse_models():
    assert evaluate.parse_models(["a=/x", "b=s3://bk/y=z"]) == {"a": "/x", "b": "s3://bk/y=z"}
    for bad in (["a"], ["=x"], ["a/b=x"], ["a=x", "a=y"]):
        with pytest.raises(UserError):
            evaluate.parse_models(bad)


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------


def _check_metrics(m: dict, names: list[str], n_images: int = 12) -> None:
    assert set(m) >= {"models", "filter", "capfilt", "test"}
    assert set(m["models"]) == set(names)
    assert m["test"] == {"images": n_images, "texts": 5 * n_images, "k_test": 4}
    for name in names:
        mm = m["models"][name]
        for key in [*RETRIEVAL_KEYS, "bleu4", "cider", "grammar_match"]:
            assert isinstance(mm[key], float), key
        for key in [*RETRIEVAL_KEYS, "bleu4", "grammar_match"]:
            assert 0.0 <= mm[key] <= 100.0, (key, mm[key])
        assert mm["cider"] >= 0.0
        assert mm["tr_r1"] <= mm["tr_r5"] <= mm["tr_r10"] and mm["ir_r1"] <= mm["ir_r5"] <= mm["ir_r10"]
        assert mm["mean_r1"] == pytest.approx((mm["tr_r1"] + mm["ir_r1"]) / 2)
        # every value is a number: dvc metrics show reads it as is
        assert all(isinstance(v, int | float) for v in mm.values())


def test_evaluate_cli_writes_metrics_and_reports(no_tracking, test_split, models, capfilt_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["evaluate", "--test", test_split, "--output", str(out), "--capfilt", capfilt_dir]
    for name, uri in models.items():
        argv += ["--model", f"{name}={uri}"]
    for ov in CFG:
        argv += ["--set", ov]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| noisy |" in printed and "| capfilt |" in printed

    assert sorted(p.name for p in out.iterdir()) == ["captions.json", "metrics.json", "report.html", "report.md"]
    m = json.loads((out / "metrics.json").read_text())
    _check_metrics(m, ["noisy", "capfilt"])
    assert m["filter"]["precision"] == pytest.approx(0.9) and m["filter"]["recall"] == pytest.approx(9 / 11)
    assert m["filter"]["wrong_attribute"]["recall"] == pytest.approx(0.5)
    assert m["capfilt"]["kept_share"]["synthetic"] == pytest.approx(0.75)
    assert m["filter"]["threshold"] == 0.1234  # from CapFilt's summary.json

    md = (out / "report.md").read_text()
    assert "Filter threshold 0.1234, chosen on 300 labelled calibration captions for precision >= 0.9 there." in md
    assert "| model | TR@1 | IR@1 | TR@5 | IR@5 | mean R@1 | BLEU-4 | CIDEr | grammar match |" in md
    row = next(line for line in md.splitlines() if line.startswith("| noisy |"))
    assert row.split("|")[6].strip() == f"{m['models']['noisy']['mean_r1']:.1f}"
    assert "| wrong_attribute | 4 | 2 | 0.667 | 0.500 |" in md
    assert "| wrong_attribute: shape | 3 | 1 | 0.500 | 0.333 |" in md
    assert "synthetic distinct 1 0.667" in md
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<table>") == 3 and "<td>capfilt</td>" in page

    caps = json.loads((out / "captions.json").read_text())
    assert len(caps["keys"]) == 12 and set(caps["captions"]) == {"noisy", "capfilt"}
    assert all(len(c) == 12 and all(isinstance(x, str) for x in c) for c in caps["captions"].values())


def test_evaluate_grammar_match_counts_correct_captions(no_tracking, test_split, models, tmp_path, monkeypatch):
    """The test split's json holds the scene; a model that writes its first reference scores 100%."""
    from blip_core.data.splits import load_eval_split

    split = load_eval_split(test_split, 32)
    assert all("scene" in s for s in split.samples)
    refs = {s["__key__"]: split.texts[split.img2txt[i][0]] for i, s in enumerate(split.samples)}
    order = [s["__key__"] for s in split.samples]
    calls = {"n": 0}

    def oracle(model, tokenizer, images, **kw):
        start = calls["n"]
        calls["n"] += images.shape[0]
        return [refs[k] for k in order[start:calls["n"]]]

    monkeypatch.setattr(evaluate, "generate_captions", oracle)
    res = evaluate.run(load_config(None, CFG), {"oracle": models["noisy"]}, test_split, str(tmp_path / "o"))
    m = res.metrics["models"]["oracle"]
    assert m["grammar_match"] == 100.0
    assert m["bleu4"] == pytest.approx(100.0, abs=1e-3)
    assert res.metrics["filter"] == {} and res.metrics["capfilt"] == {}


def test_evaluate_decoding_settings_reach_generation(test_split, models, monkeypatch):
    """evaluate.repetition_penalty and evaluate.length_norm are what the captions are generated with."""
    from blip_core.checkpoint_io import load_model_dir
    from blip_core.data.splits import load_eval_split
    from blip_core.generation import generate_captions

    ckpt = load_model_dir(models["noisy"])
    model, tok = ckpt.model.eval(), ckpt.tokenizer
    split = load_eval_split(test_split, 32)
    sets = CFG + ["evaluate.max_length=12", "evaluate.min_length=3"]
    base = load_config(None, sets).evaluate
    assert (base.repetition_penalty, base.length_norm) == (1.0, "current")
    ecfg = load_config(None, sets + ["evaluate.repetition_penalty=3.0", "evaluate.length_norm=hf415"]).evaluate
    seen = []

    def spy(*args, **kw):
        seen.append((kw["repetition_penalty"], kw["length_norm"]))
        return generate_captions(*args, **kw)

    monkeypatch.setattr(evaluate, "generate_captions", spy)
    plain = evaluate.split_captions(model, tok, split, base)
    assert seen and set(seen) == {(1.0, "current")}
    seen.clear()
    penalised = evaluate.split_captions(model, tok, split, ecfg)
    assert seen and set(seen) == {(3.0, "hf415")}
    direct = generate_captions(model, tok, split.images, num_beams=3, max_length=12, min_length=3,
                               repetition_penalty=3.0, length_norm="hf415", prompt=ecfg.prompt)
    assert penalised == direct and len(plain) == len(penalised) == 12
    assert decoding_note(base) == ""
    assert decoding_note(ecfg) == ", repetition penalty 3, beams length-normalised as transformers 4.15"
    with pytest.raises(UserError, match="evaluate.length_norm"):
        load_config(None, ["evaluate.length_norm=newest"])


def test_k_test_defaults_to_the_official_coco_value_and_the_demo_sets_its_own():
    import yaml

    assert load_config(None, []).evaluate.k_test == 256
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    assert params["evaluate"]["k_test"] == 8  # the demo's committed numbers were measured with k_test 8


def test_evaluate_s3_inputs_and_output(no_tracking, s3_bucket, test_split, models, capfilt_dir):
    storage.upload_dir(models["noisy"], f"s3://{s3_bucket}/ckpt/model")  # a stage output holding model/
    storage.upload_file(Path(capfilt_dir) / "provenance.jsonl", f"s3://{s3_bucket}/capfilt/provenance.jsonl")
    out = f"s3://{s3_bucket}/eval"
    res = evaluate.run(load_config(None, CFG), {"noisy": f"s3://{s3_bucket}/ckpt"}, test_split, out,
                       capfilt=f"s3://{s3_bucket}/capfilt")
    m = storage.read_json(f"{out}/metrics.json")
    assert m == json.loads(json.dumps(res.metrics))
    _check_metrics(m, ["noisy"])
    assert m["filter"]["precision"] == pytest.approx(0.9)
    assert storage.read_text(f"{out}/report.md").startswith("# BLIP evaluation")
    assert storage.exists(f"{out}/report.html")


def test_evaluate_errors(no_tracking, test_split, models, tmp_path):
    cfg = load_config(None, CFG)
    with pytest.raises(UserError, match="provenance not found"):
        evaluate.run(cfg, {"a": models["noisy"]}, test_split, str(tmp_path / "x"), capfilt=str(tmp_path))
    with pytest.raises(UserError):
        evaluate.run(cfg, {"a": str(tmp_path / "missing")}, test_split, str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_evaluate_logs_to_mlflow(tmp_path, monkeypatch, test_split, models, capfilt_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    for name in ("BLIP_PARENT_RUN_ID", "BLIP_TRACKING", "MLFLOW_EXPERIMENT_NAME", "RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    try:
        res = evaluate.run(load_config(None, CFG), models, test_split, str(tmp_path / "eval"), capfilt=capfilt_dir)
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run("KILLED")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["blip.stage"] == "evaluate"
    metrics = run.data.metrics
    for name in models:
        for key in ("tr_r1", "ir_r1", "tr_r5", "ir_r5", "mean_r1", "bleu4", "cider", "grammar_match"):
            assert metrics[f"{name}/{key}"] == pytest.approx(res.metrics["models"][name][key])
    assert metrics["filter/precision"] == pytest.approx(0.9)
    assert metrics["filter/unrelated/recall"] == 1.0
    assert metrics["capfilt/kept_share/synthetic"] == pytest.approx(0.75)
    assert run.data.params["evaluate.k_test"] == "4"

    def paths(path=None):
        out = []
        for info in client.list_artifacts(res.run_id, path):
            out += paths(info.path) if info.is_dir else [info.path]
        return out

    arts = set(paths())
    assert {"report/report.md", "report/report.html", "report/metrics.json", "comparison.json",
            "captions_noisy.json", "captions_capfilt.json"} <= arts
    table = json.loads(Path(client.download_artifacts(res.run_id, "comparison.json", str(tmp_path))).read_text())
    assert table["columns"][0] == "model" and "mean R@1" in table["columns"]
    assert [row[0] for row in table["data"]] == ["noisy", "capfilt"]
    samples = json.loads(Path(client.download_artifacts(res.run_id, "captions_capfilt.json", str(tmp_path))).read_text())
    assert len(samples["data"]) == 2  # evaluate.log_samples

    # The pipeline's parent run shows the Table-1 comparison: metrics, the table and the reports.
    parent_id = run.data.tags["mlflow.parentRunId"]
    parent = client.get_run(parent_id)
    for name in models:
        for key in ("tr_r1", "ir_r1", "mean_r1", "bleu4", "cider"):
            assert parent.data.metrics[f"{name}/{key}"] == pytest.approx(res.metrics["models"][name][key])
    assert parent.data.metrics["filter/precision"] == pytest.approx(0.9)
    assert {"comparison.json", "report/report.html", "report/report.md"} <= {
        p for d in ("", "report") for p in (i.path for i in client.list_artifacts(parent_id, d or None))}
    ptable = json.loads(Path(client.download_artifacts(parent_id, "comparison.json", str(tmp_path / "p"))).read_text())
    assert ptable == table
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_threshold_note():
    assert threshold_note({}) == ""
    assert threshold_note({"threshold": 0.5}) == " Filter threshold 0.5 (capfilt.threshold)."
    cal = {"threshold": 0.2, "captions": 30, "target_precision": 0.9, "met": False}
    assert "(not reached there: the most precise threshold)" in threshold_note({"threshold": 0.2,
                                                                                          "calibration": cal})


def test_evaluate_resumes_retrieval_from_saved_blocks(no_tracking, test_split, models, tmp_path):
    blocks = tmp_path / "blocks"
    fresh = evaluate.run(load_config(None, CFG), {"noisy": models["noisy"]}, test_split, str(tmp_path / "a"))
    cfg = load_config(None, [*CFG, f"evaluate.resume_dir={blocks}"])
    first = evaluate.run(cfg, {"noisy": models["noisy"]}, test_split, str(tmp_path / "b"))
    saved = sorted(p.name for p in blocks.glob("*/*.pt"))
    assert saved and {n[:3] for n in saved} == {"i2t", "t2i"}
    again = evaluate.run(cfg, {"noisy": models["noisy"]}, test_split, str(tmp_path / "c"))  # all blocks read back
    retrieval = [k for k in fresh.metrics["models"]["noisy"] if k.startswith(("tr_", "ir_", "r_", "mean_r"))]
    for res in (first, again):
        assert {k: res.metrics["models"]["noisy"][k] for k in retrieval} == \
            {k: fresh.metrics["models"]["noisy"][k] for k in retrieval}
