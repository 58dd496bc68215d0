"""``blip vqa`` in-process on a tiny VQA checkpoint: generation, ranking, JSON output and its one-line errors."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from blip_hf_testing import make_tokenizer
from PIL import Image

from blip_core import build_model, load_model_dir, model_preset, save_model_dir
from blip_core.models.vqa import BlipVQA
from blip_core.vqa import generate_answers, rank_answers
from components.cli import main as cli
from components.infer import eval_transform, load_image

QUESTION = "what is the dog doing?"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = model_preset("tiny")
    vqa = BlipVQA(dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=len(tok))))
    with torch.no_grad():
        for p in vqa.text_decoder.parameters():
            p.mul_(5.0)  # answers that differ between images
    root = tmp_path_factory.mktemp("ckpts")
    save_model_dir(root / "vqa", vqa, tok)
    save_model_dir(root / "caption", build_model(cfg, vocab_size=len(tok)), tok)
    return root / "vqa", root / "caption"


@pytest.fixture()
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(40, 30), (64, 64), (32, 48)]):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def _expected(vqa_dir, paths, answers=None, **kw):
    ckpt = load_model_dir(vqa_dir)
    transform = eval_transform(ckpt.model.cfg.vision.image_size)
    batch = torch.stack([load_image(p, transform) for p in paths])
    if answers is not None:
        return rank_answers(ckpt.model, ckpt.tokenizer, batch, [QUESTION] * len(paths), answers, **kw)
    return generate_answers(ckpt.model, ckpt.tokenizer, batch, [QUESTION] * len(paths), **kw)


def test_vqa_generates_one_answer_per_image(checkpoints, images, capsys):
    vqa_dir, _ = checkpoints
    assert cli(["vqa", "--checkpoint", str(vqa_dir), *images, "--question", QUESTION, "--device", "cpu"]) == 0
    lines = [line.strip() for line in capsys.readouterr().out.rstrip("\n").split("\n")]
    assert [line.split("\t") for line in lines] == [[p, a] for p, a in zip(images, _expected(vqa_dir, images))]

    assert cli(["vqa", "--checkpoint", str(vqa_dir), *images, "--question", QUESTION, "--device", "cpu",
                "--decoding", "greedy", "--max-length", "4", "--json", "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.rstrip("\n").split("\n")]
    want = _expected(vqa_dir, images, decoding="greedy", max_length=4)
    assert rows == [{"image": p, "question": QUESTION, "answer": a} for p, a in zip(images, want)]
    assert all(len(r["answer"].split()) <= 3 for r in rows)  # 4 tokens with [DEC]: at most 3 words


@pytest.mark.parametrize("as_json", [False, True])
def test_vqa_ranks_an_answer_file(checkpoints, images, tmp_path, capsys, as_json):
    vqa_dir, _ = checkpoints
    answers = ["running", "a dog", "two cats", "the red circle", "food", "grass"]
    f = tmp_path / ("answers.json" if as_json else "answers.txt")
    f.write_text(json.dumps(answers) if as_json else "\n".join(answers + ["", "running"]) + "\n")
    assert cli(["vqa", "--checkpoint", str(vqa_dir), *images, "--question", QUESTION, "--answers", str(f),
                "--k", "3", "--json", "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.rstrip("\n").split("\n")]
    want = _expected(vqa_dir, images, answers, k=3)
    assert [(r["image"], r["question"], r["answer"]) for r in rows] == [(p, QUESTION, a) for p, (a, _) in
                                                                        zip(images, want)]
    for r, (_, s) in zip(rows, want):
        assert r["score"] == pytest.approx(s, rel=1e-5) and r["score"] < 0


def test_vqa_missing_image_is_reported_and_the_others_answered(checkpoints, images, tmp_path, capsys):
    vqa_dir, _ = checkpoints
    missing = str(tmp_path / "nope.jpg")
    code = cli(["vqa", "--checkpoint", str(vqa_dir), images[0], missing, images[1], "--question", QUESTION,
                "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 2
    assert [line.strip().split("\t")[0] for line in out.rstrip("\n").split("\n")] == [images[0], images[1]]
    assert err.strip() == f"blip vqa: error: {missing}: no such file"


@pytest.mark.parametrize("argv,message", [
    (["--question", "  "], "--question is empty"),
    (["--question", QUESTION, "--max-length", "1"], "--max-length must be >= 2"),
    (["--question", QUESTION, "--k", "0"], "--k must be >= 1"),
    (["--question", QUESTION, "--answers", "/nonexistent/answers.txt"], "no such file"),
])
def test_vqa_bad_arguments_are_one_line_errors(checkpoints, images, argv, message, capsys):
    vqa_dir, _ = checkpoints
    assert cli(["vqa", "--checkpoint", str(vqa_dir), images[0], *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_vqa_bad_answer_files(checkpoints, images, tmp_path, capsys):
    vqa_dir, _ = checkpoints
    for name, text, message in [("empty.txt", "\n\n", "no answers in the file"),
                                ("bad.json", "[1, 2]", "list of strings"),
                                ("broken.json", "[\"a\",", "not valid JSON")]:
        (tmp_path / name).write_text(text)
        assert cli(["vqa", "--checkpoint", str(vqa_dir), images[0], "--question", QUESTION, "--answers",
                    str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


def test_checkpoint_without_vqa_decoder_is_refused_and_caption_refuses_vqa(checkpoints, images, capsys):
    vqa_dir, caption_dir = checkpoints
    assert cli(["vqa", "--checkpoint", str(caption_dir), images[0], "--question", QUESTION]) == 2
    err = capsys.readouterr().err
    assert "has no VQA decoder" in err and err.count("\n") == 1
    assert cli(["caption", "--checkpoint", str(vqa_dir), images[0]]) == 2
    err = capsys.readouterr().err
    assert "is a VQA model: use 'blip vqa'" in err and err.count("\n") == 1


def test_long_question_is_cut_with_a_note(checkpoints, images, capsys):
    vqa_dir, _ = checkpoints
    question = " ".join(["dog"] * 50)
    assert cli(["vqa", "--checkpoint", str(vqa_dir), images[0], "--question", question, "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "the question has 52 tokens; the model reads its first 35" in err
