"""``blip caption`` and ``blip itm`` run in-process on a tiny checkpoint."""

import json

import numpy as np
import pytest
import torch
from blip_hf_testing import make_tokenizer
from PIL import Image

from blip_core import build_model, model_preset, save_model_dir
from components.cli import main as cli
from components.infer import eval_transform, load_image


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = make_tokenizer()
    torch.manual_seed(0)
    model = build_model(model_preset("tiny"), vocab_size=len(tok))
    d = tmp_path_factory.mktemp("ckpt") / "caption"
    save_model_dir(d, model, tok)
    return d


@pytest.fixture()
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(40, 30), (64, 64)]):
        p = tmp_path / f"img{i}.{'png' if i else 'jpg'}"
        Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 this is not a jpeg")
    return paths, str(broken)


def test_caption_prints_one_line_per_image_and_reports_bad_ones(checkpoint, images, capsys):
    (good1, good2), broken = images
    code = cli(["caption", "--checkpoint", str(checkpoint), good1, broken, good2, "--decoding", "greedy",
                "--batch-size", "1", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 2  # like every other input error
    lines = out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [good1, good2]
    assert "broken.jpg: cannot read image" in err and err.count("\n") == 1


def test_caption_json_beam_and_nucleus_seed(checkpoint, images, capsys):
    (good1, good2), _ = images
    assert cli(["caption", "--checkpoint", str(checkpoint), good1, good2, "--json", "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in rows] == [good1, good2] and all(isinstance(r["caption"], str) for r in rows)

    def sample(seed):
        args = ["caption", "--checkpoint", str(checkpoint), good1, good2, "--decoding", "nucleus", "--json",
                "--seed", str(seed), "--max-length", "12", "--device", "cpu"]
        assert cli(args) == 0
        return capsys.readouterr().out

    assert sample(3) == sample(3)


def test_caption_decoding_options_reach_generation(checkpoint, images, capsys, monkeypatch):
    """--repetition-penalty and --length-norm are passed to generation; an unknown rule is a usage error."""
    from components import infer

    (good1, good2), _ = images
    seen = []
    real = infer.generate_captions

    def spy(*args, **kw):
        seen.append((kw["repetition_penalty"], kw["length_norm"]))
        return real(*args, **kw)

    monkeypatch.setattr(infer, "generate_captions", spy)
    assert cli(["caption", "--checkpoint", str(checkpoint), good1, good2, "--device", "cpu"]) == 0
    assert cli(["caption", "--checkpoint", str(checkpoint), good1, good2, "--device", "cpu",
                "--repetition-penalty", "1.1", "--length-norm", "hf415"]) == 0
    assert seen == [(None, "current"), (1.1, "hf415")]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli(["caption", "--checkpoint", str(checkpoint), good1, "--length-norm", "newest"])
    assert e.value.code == 2


def test_itm_scores_each_text(checkpoint, images, capsys):
    (good1, _), broken = images
    texts = ["a dog on the grass", "a red circle"]
    assert cli(["itm", "--checkpoint", str(checkpoint), good1, *texts, "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, text in zip(lines, texts):
        itm, itc, shown = line.split("\t")
        assert 0.0 <= float(itm.removeprefix("itm=")) <= 1.0 and -1.0 <= float(itc.removeprefix("itc=")) <= 1.0
        assert shown == text
    assert cli(["itm", "--checkpoint", str(checkpoint), good1, "a dog", "--json", "--itm-first-token", "cls",
                "--device", "cpu"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"image", "text", "itm", "itc"}
    assert cli(["itm", "--checkpoint", str(checkpoint), broken, "a dog", "--device", "cpu"]) == 2
    assert "cannot read image" in capsys.readouterr().err


def test_bad_checkpoint_is_one_line_error(tmp_path, images, capsys):
    (good1, _), _ = images
    assert cli(["caption", "--checkpoint", str(tmp_path / "nope"), good1]) == 2
    err = capsys.readouterr().err
    assert err.startswith("blip caption: error:") and "not found" in err and err.count("\n") == 1
    torch.manual_seed(0)
    save_model_dir(tmp_path / "notok", build_model(model_preset("tiny"), vocab_size=100))
    assert cli(["caption", "--checkpoint", str(tmp_path / "notok"), good1]) == 2
    assert "no tokenizer" in capsys.readouterr().err


def test_eval_transform_resizes_and_normalises(images):
    (good1, _), _ = images
    x = load_image(good1, eval_transform(32))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert -2.0 < float(x.min()) and float(x.max()) < 2.5
