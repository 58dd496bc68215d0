"""Device and precision correctness that can be checked on a CPU-only machine.

* Every ``torch.Generator`` of the library and stages is made on an explicit device (by one helper).
* The whole workflow (pre-train, both fine-tunings, CapFilt) runs under bf16 autocast.
* One training step runs with ``torch.compile``.
* Batches reach a CUDA device from pinned memory (the loader settings chosen for a CUDA device).
"""

from __future__ import annotations

import ast
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from toy_data import TINY

from blip_core import losses
from blip_core.config import load_config
from blip_core.data.loader import make_loader, pin_memory_for
from blip_core.seeding import derive_seed, make_generator
from blip_core.tokenizer import BlipTokenizer
from components import capfilt, finetune, pretrain

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("blip_core", "components", "pipelines", "benchmarks")
HELPER = ROOT / "blip_core" / "seeding.py"


# ------------------------------------------------------------------------------------------- generators


def _generator_calls(path: Path) -> list[tuple[int, bool]]:
    """``(line, has_device)`` of every ``torch.Generator(...)`` call in a Python file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = {"torch.Generator"}  # also catch ``from torch import Generator [as G]``
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "torch":
            names |= {a.asname or a.name for a in node.names if a.name == "Generator"}
    calls = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func) in names:
            has_device = bool(node.args) or any(k.arg == "device" for k in node.keywords)
            calls.append((node.lineno, has_device))
    return calls


def test_every_generator_is_made_on_a_device_by_the_one_helper():
    """A CPU generator handed to ``torch.multinomial`` on a CUDA tensor fails; so never build one implicitly."""
    files = [p for d in CODE_DIRS for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 40 and HELPER in files
    without_device, elsewhere = [], []
    for path in files:
        for line, has_device in _generator_calls(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            if not has_device:
                without_device.append(where)
            if path != HELPER:
                elsewhere.append(where)
    assert not without_device, f"torch.Generator without a device: {without_device}"
    assert not elsewhere, f"torch.Generator built outside blip_core/seeding.make_generator: {elsewhere}"
    assert _generator_calls(HELPER) == [(_generator_calls(HELPER)[0][0], True)]


def test_make_generator_device_and_seed():
    g = make_generator("cpu", 7)
    assert g.device == torch.device("cpu") and g.initial_seed() == 7
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=torch.Generator().manual_seed(7)))
    assert make_generator(torch.device("cpu"), derive_seed(42, 3, 1)).initial_seed() == derive_seed(42, 3, 1)
    # distinct steps and ranks give distinct seeds; the values are those the training loop always used
    assert derive_seed(42, 0, 0) == 42 * 1_000_003
    assert len({derive_seed(42, s, r) for s in range(50) for r in range(8)}) == 400
    if torch.cuda.is_available():
        g = make_generator("cuda", 7)
        assert g.device.type == "cuda"
        w = torch.ones(3, 5, device="cuda")
        assert torch.multinomial(w, 1, generator=g).device.type == "cuda"


# ------------------------------------------------------------------------------------------- bf16


def test_losses_are_fp32_for_bf16_logits():
    """bf16 logits (a bf16 model, or autocast) give fp32 losses equal to those of the same values in fp32."""
    g = make_generator("cpu", 0)
    sim = (torch.randn(4, 10, generator=g) * 5).bfloat16()
    hard = torch.zeros(4, 10)
    hard[:, :4] = torch.eye(4)
    targets = losses.soft_targets(sim, hard, 0.4)
    assert targets.dtype == torch.float32
    torch.testing.assert_close(targets, losses.soft_targets(sim.float(), hard, 0.4))
    itc = losses.itc_loss(sim, sim, targets, targets)
    assert itc.dtype == torch.float32
    torch.testing.assert_close(itc, losses.itc_loss(sim.float(), sim.float(), targets, targets))
    itm_logits = torch.randn(12, 2, generator=g).bfloat16()
    labels = losses.itm_labels(4, itm_logits.device)
    assert labels.tolist() == [1] * 4 + [0] * 8
    assert losses.itm_loss(itm_logits, labels).dtype == torch.float32
    torch.testing.assert_close(losses.itm_loss(itm_logits, labels), losses.itm_loss(itm_logits.float(), labels))
    lm_logits = torch.randn(3, 6, 50, generator=g).bfloat16()
    lm_labels = torch.randint(0, 50, (3, 6), generator=g)
    lm_labels[0, 4:] = losses.IGNORE_INDEX
    for reduction in ("mean", "sum_per_sequence"):
        got = losses.lm_loss(lm_logits, lm_labels, reduction=reduction)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, losses.lm_loss(lm_logits.float(), lm_labels, reduction=reduction))


class _DtypeRecorder:
    """Counts the output dtypes of every ``nn.Linear`` forward while active (a global forward hook)."""

    def __init__(self):
        self.dtypes: Counter[torch.dtype] = Counter()

    def __enter__(self):
        def hook(module, args, output):
            if isinstance(module, torch.nn.Linear) and isinstance(output, torch.Tensor):
                self.dtypes[output.dtype] += 1

        self._handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def _check_weights(model_dir: Path) -> dict:
    weights = load_file(model_dir / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values() if t.is_floating_point())
    assert all(bool(torch.isfinite(t).all()) for t in weights.values() if t.is_floating_point())
    return weights


def test_workflow_runs_under_bf16_autocast(toy_data, tmp_path, no_tracking):
    """Pre-train, fine-tune both heads (``precision: bf16``) and CapFilt under bf16 autocast (CPU here)."""
    steps = ["pretrain.max_steps=3", "finetune_captioner.max_steps=2", "finetune_filter.max_steps=2",
             "finetune_captioner.epochs=1", "finetune_filter.epochs=1"]
    cfg = load_config(None, TINY + steps + [f"{s}.precision=bf16"
                                            for s in ("pretrain", "finetune_captioner", "finetune_filter")])
    with _DtypeRecorder() as rec:
        pre = pretrain.run(cfg, [toy_data["web"], toy_data["human"]], str(tmp_path / "pre"))
    assert rec.dtypes[torch.bfloat16] > 0, "pre-training did not run under bf16 autocast"
    assert pre.steps == 3 and all(map(torch.isfinite, map(torch.tensor, pre.losses.values())))
    init = _check_weights(tmp_path / "pre" / "model")

    with _DtypeRecorder() as rec:
        cap = finetune.run(cfg, "captioner", str(tmp_path / "pre"), [toy_data["human"]], str(tmp_path / "cap"))
        fil = finetune.run(cfg, "filter", str(tmp_path / "pre"), [toy_data["human"]], str(tmp_path / "fil"))
    assert rec.dtypes[torch.bfloat16] > 0
    assert set(cap.losses) == {"lm", "loss"} and set(fil.losses) == {"itc", "itm", "loss"}
    assert all(map(torch.isfinite, map(torch.tensor, [*cap.losses.values(), *fil.losses.values()])))
    fil_w = _check_weights(tmp_path / "fil" / "model")
    _check_weights(tmp_path / "cap" / "model")
    assert not torch.equal(init["itm_head.weight"], fil_w["itm_head.weight"])  # it did train

    ccfg = load_config(None, TINY + ["capfilt.max_length=8", "capfilt.min_length=3", "capfilt.batch_size=8"])
    out = tmp_path / "cf"
    device_type = "cuda" if torch.cuda.is_available() else "cpu"  # where the stage runs (init_from_env)
    with torch.autocast(device_type, dtype=torch.bfloat16), _DtypeRecorder() as rec:
        res = capfilt.run(ccfg, str(tmp_path / "cap"), str(tmp_path / "fil"), [toy_data["web"]], [], str(out),
                          progress=False)
    assert rec.dtypes[torch.bfloat16] > 0
    prov = [json.loads(line) for line in (out / "provenance.jsonl").read_text().splitlines()]
    assert Counter(p["source"] for p in prov) == {"web": 64, "synthetic": 64}
    assert all(isinstance(p["itm_score"], float) and 0.0 <= p["itm_score"] <= 1.0 for p in prov)
    assert all(p["kept"] == (p["itm_score"] >= res.threshold) for p in prov)
    assert all(p["caption"] for p in prov if p["source"] == "synthetic")


# ------------------------------------------------------------------------------------------- host to device


def test_loader_pins_memory_only_for_cuda(toy_data):
    assert pin_memory_for("cuda") and pin_memory_for("cuda:1") and pin_memory_for(torch.device("cuda", 0))
    assert not pin_memory_for("cpu") and not pin_memory_for(torch.device("cpu"))
    tok = BlipTokenizer.from_corpus(["a red circle", "two blue squares"], 100)

    def loader(device, workers=0):
        return make_loader([toy_data["human"]], tok, image_size=32, batch_size=8, train=True, num_workers=workers,
                           pin_memory=pin_memory_for(device), expand_captions=True)

    assert loader("cpu").data_loader() is None  # CPU: batches are read in this process, unpinned
    assert loader("cpu", workers=1).data_loader().pin_memory is False
    for workers in (0, 1):
        dl = loader("cuda:0", workers).data_loader()
        assert dl.pin_memory is True and dl.num_workers == workers
    # The pinning path yields the same batches as the plain one (pinned only where a CUDA runtime exists).
    plain, pinned = list(loader("cpu")), list(loader("cuda"))
    assert len(plain) == len(pinned) > 0
    for a, b in zip(plain, pinned):
        assert a["text"] == b["text"] and torch.equal(a["image"], b["image"])
        assert torch.equal(a["input_ids"], b["input_ids"])
        if torch.cuda.is_available():
            assert b["image"].is_pinned() and b["input_ids"].is_pinned()


# ------------------------------------------------------------------------------------------- torch.compile


@pytest.mark.slow
def test_one_training_step_with_torch_compile(toy_data, tmp_path, no_tracking, monkeypatch):
    """``pretrain.compile: true`` compiles the image and text encoders; one step gives the eager losses."""
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)  # dropout draws as in eager mode
    over = TINY + ["pretrain.max_steps=1", "pretrain.epochs=1"]
    eager = pretrain.run(load_config(None, over), [toy_data["human"]], str(tmp_path / "eager"))
    torch._dynamo.reset()
    compiled = pretrain.run(load_config(None, over + ["pretrain.compile=true"]), [toy_data["human"]],
                            str(tmp_path / "compiled"))
    assert compiled.steps == eager.steps == 1
    assert set(compiled.losses) == {"itc", "itm", "lm", "loss"}
    for k, v in eager.losses.items():
        assert compiled.losses[k] == pytest.approx(v, rel=1e-3, abs=1e-4), k
    a = load_file(tmp_path / "eager" / "model" / "model.safetensors")
    b = load_file(tmp_path / "compiled" / "model" / "model.safetensors")
    assert a.keys() == b.keys()  # no "_orig_mod." prefixes from the compiled modules
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)
