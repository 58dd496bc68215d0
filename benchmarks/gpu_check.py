"""GPU check: pre-training speed and MFU, the whole pipeline on the device, and parity and speed against
``transformers``, in one command and one table.

    python -m benchmarks.gpu_check                      # on a GPU: base @ 224 px, batch 64, bf16; < 8 min
    python -m benchmarks.gpu_check --device cpu --quick  # CPU smoke run (tiny everything, well under a minute)

Rows (a failing row prints FAIL with a one-line reason, the others still run; the exit status is 1 if any
row failed):

* ``pretrain step``: one full pre-training step (ITC + ITM + LM forward, backward, AdamW, momentum update,
  enqueue) of ``--preset`` (default ``base``, ViT-B/16 at 224 px + BERT-base MED) on random inputs of
  ``--batch-size`` pairs, under bf16 autocast on CUDA (``--precision``). ``--warmup`` steps first, then
  ``--steps`` timed steps: seconds per step, images/s, peak memory (``torch.cuda.max_memory_allocated``; on
  CPU the process's peak RSS), and MFU = FLOPs of one step / step time / peak FLOP/s. The FLOPs are counted by
  ``torch.utils.flop_counter.FlopCounterMode`` over one step (forward and backward matmuls, convolutions and
  attention). The peak is the GPU's dense bf16 tensor-core rate (:data:`PEAK_BF16_TFLOPS`, e.g. 989 TFLOP/s
  for H100 SXM and H200) or ``--peak-tflops``; on CPU or an unknown GPU MFU is n/a unless that is given.
* ``pipeline (tiny)``: ingest (four toy-web sources), pretrain, finetune captioner, finetune filter, capfilt
  (threshold calibrated on a labelled sample), repretrain on the CapFilt data, evaluate both models: each
  stage's ``run()`` in this process, with the stage test suite's tiny settings, on the device the stages
  pick (CUDA when visible), bf16 autocast in training on CUDA. Each row: the stage's wall time and whether it
  finished and wrote its completion marker.
* ``vs transformers``: :mod:`benchmarks.caption`'s comparison on this device: the same random weights
  (``--caption-preset``, default ``base`` at 384 px) in blip_core and, exported with
  :func:`blip_core.convert.save_hf`, in ``BlipForConditionalGeneration`` / ``BlipForImageTextRetrieval``;
  greedy and beam-3 captions of ``--caption-batch`` images, ITM re-ranking of one image against
  ``--itm-texts`` texts. fp32 on both sides (the outputs must match: captions token for token, ITM logits and
  ITC scores within 1e-4), the two sides alternating, the fastest of ``--repeats`` runs each.

A time budget (``--budget-s``, default 450 s) bounds the whole run: each section gets at most its share of
what is left and is stopped (its unfinished rows FAIL) when that runs out, so the table is always printed.
``--device cpu`` hides the GPUs from this process (``CUDA_VISIBLE_DEVICES=""``) so the stages run on CPU too.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks import caption
from benchmarks.common import (
    CheckTimeout,
    bert_special_ids,
    one_line,
    peak_rss_mib,
    pretrain_step,
    random_pretrain_batches,
    reset_peak_rss,
    sync,
    time_limit,
)

# Dense (no sparsity) bf16 tensor-core peak per GPU, in TFLOP/s, matched in order against the device name.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
)

# The stage tests' tiny settings (tests/toy_data.py TINY and the capfilt/evaluate tests), one epoch each.
PIPELINE_OVERRIDES = [
    "model.preset=tiny", "ingest.resolution=32", "data.shuffle_buffer=50",
    "pretrain.batch_size=8", "pretrain.warmup_steps=2", "pretrain.epochs=1", "pretrain.log_every=1",
    "finetune_captioner.batch_size=8", "finetune_captioner.epochs=1",
    "finetune_filter.batch_size=8", "finetune_filter.epochs=1",
    "capfilt.max_length=8", "capfilt.min_length=3", "capfilt.batch_size=8", "capfilt.target_precision=0.6",
    "evaluate.k_test=4", "evaluate.batch_size=8", "evaluate.itm_batch_size=16", "evaluate.log_samples=0",
]
PIPELINE_SOURCES = {
    "web": "toyweb://?split=web&n=64&seed=1&size=32",
    "human": "toyweb://?split=human&n=24&seed=1&size=32",
    "test": "toyweb://?split=test&n=12&seed=1&size=32",
    "calibration": "toyweb://?split=web&n=30&seed=2&size=32",
}
PIPELINE_STAGES = ("ingest", "pretrain", "finetune captioner", "finetune filter", "capfilt", "repretrain",
                   "evaluate")
COMPARE_TASKS = {"greedy": "greedy captions", "beam3": "beam-3 captions", "itm": "ITM re-rank"}
ITM_ATOL = 1e-4

# Each section's share of the time budget (seconds), capped by what is left of the whole budget.
SECTION_CAPS_S = {"pretrain": 150.0, "pipeline": 150.0, "compare": 240.0}

PASS, FAIL = "PASS", "FAIL"


@dataclass
class Row:
    check: str
    status: str
    seconds: float
    result: str


def peak_tflops(device: torch.device, precision: str, given: float | None) -> tuple[float | None, str]:
    """The peak TFLOP/s MFU is measured against, and where it came from."""
    if given:
        return given, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak known for CPU"
    if precision != "bf16":
        return None, f"peaks known for bf16 only, this ran {precision}"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops, f"{name} bf16 dense"
    return None, f"no peak known for {name}"


# ------------------------------------------------------------------------------------ pre-training step


def check_pretrain(args, device: torch.device, deadline: float) -> Iterator[Row]:
    from torch.utils.flop_counter import FlopCounterMode

    from blip_core import build_model
    from blip_core.config import load_config
    from blip_core.objectives import PretrainObjective
    from blip_core.train.optim import build_optimizer

    t0 = time.perf_counter()
    overrides = [f"model.preset={args.preset}"]
    if args.image_size:
        overrides.append(f"model.vision.image_size={args.image_size}")
    cfg = load_config(None, overrides)
    size = cfg.model.vision.image_size
    vocab = cfg.model.text.vocab_size or 1000  # presets built from a corpus tokenizer have no fixed size
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=vocab)
    objective = PretrainObjective(model, bert_special_ids(vocab)).to(device).train()
    optimizer = build_optimizer(objective, cfg.pretrain)
    batches = random_pretrain_batches(args.batch_size, size, vocab, device=device,
                                      text_len=min(30, cfg.model.max_text_len))

    def step():
        out = pretrain_step(objective, optimizer, next(batches), precision=args.precision)
        loss = float(out.loss.detach())
        if not math.isfinite(loss):
            raise RuntimeError(f"the loss is {loss}")
        return loss

    for _ in range(args.warmup):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    # Timed steps: --steps, or fewer when two more would run past the section's deadline.
    times: list[float] = []
    sync(device)
    while len(times) < args.steps:
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
        if time.time() + 2 * times[-1] > deadline:
            break
    s_per_step = sum(times) / len(times)
    if device.type == "cuda":
        memory = f"peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB allocated"
    else:
        memory = f"peak RSS {peak_rss_mib() / 1024:.2f} GiB"
    peak, source = peak_tflops(device, args.precision, args.peak_tflops)
    achieved = flops / s_per_step / 1e12
    mfu = f"MFU {100 * achieved / peak:.1f}% of {peak:g} TFLOP/s ({source})" if peak else f"MFU n/a ({source})"
    short = "" if len(times) == args.steps else f" (time budget: {len(times)} of {args.steps})"
    result = (f"{s_per_step:.3f} s/step over {len(times)} steps{short}, {args.batch_size / s_per_step:.1f} images/s, "
              f"{memory}, {flops / 1e9:,.1f} GFLOP/step counted, {achieved:.2f} TFLOP/s, {mfu}")
    yield Row(pretrain_name(args), PASS, time.perf_counter() - t0, result)


def pretrain_name(args) -> str:
    from blip_core import model_preset

    size = args.image_size or model_preset(args.preset).vision.image_size
    return f"pretrain step: {args.preset}, {size} px, batch {args.batch_size}, {args.precision}"


# ------------------------------------------------------------------------------------ the whole pipeline


def _require(path: Path) -> None:
    if not path.is_file():
        raise RuntimeError(f"the stage finished without writing {path.name}")


def check_pipeline(args, device: torch.device, root: Path) -> Iterator[Row]:
    from blip_core.config import load_config
    from components import capfilt, evaluate, finetune, ingest, pretrain
    from components.cli import environment

    overrides = list(PIPELINE_OVERRIDES)
    if device.type == "cuda":
        overrides += [f"{s}.precision=bf16" for s in ("pretrain", "finetune_captioner", "finetune_filter")]
    cfg = load_config(None, overrides)
    d = {name: root / name for name in (*PIPELINE_SOURCES, "pretrain", "captioner", "filter", "capfilt",
                                        "repretrain", "evaluate")}

    def stage(name: str, fn: Callable[[], str]) -> Row:
        t = time.perf_counter()
        result = fn()
        return Row(f"pipeline ({pipeline_device()}, tiny): {name}", PASS, time.perf_counter() - t, result)

    def do_ingest() -> str:
        n_in = n_out = 0
        for name, uri in PIPELINE_SOURCES.items():
            res = ingest.run(cfg, uri, str(d[name]), progress=False)
            _require(d[name] / "manifest.json")
            n_in += res.manifest.samples_in
            n_out += res.manifest.samples_out
        return f"{n_out} of {n_in} samples kept from {len(PIPELINE_SOURCES)} toy-web sources"

    def train_result(res, marker: Path) -> str:
        _require(marker / "result.json")
        losses = ", ".join(f"{k} {v:.3f}" for k, v in res.losses.items())
        return f"{res.steps} steps, {res.pairs_per_second:.1f} pairs/s; {losses}"

    def do_pretrain() -> str:
        return train_result(pretrain.run(cfg, [str(d["web"]), str(d["human"])], str(d["pretrain"])), d["pretrain"])

    def do_finetune(task: str) -> str:
        res = finetune.run(cfg, task, str(d["pretrain"]), [str(d["human"])], str(d[task]))
        return train_result(res, d[task])

    def do_capfilt() -> str:
        res = capfilt.run(cfg, str(d["captioner"]), str(d["filter"]), [str(d["web"])], [str(d["human"])],
                          str(d["capfilt"]), calibration=[str(d["calibration"])], progress=False)
        _require(d["capfilt"] / "manifest.json")
        kept = ", ".join(f"{k} {res.texts_out.get(k, 0)}/{n}" for k, n in res.texts_in.items())
        return (f"{res.images_out} of {res.images_in} web images kept; captions kept: {kept}; "
                f"threshold {res.threshold:.3f} ({res.threshold_source})")

    def do_repretrain() -> str:
        res = pretrain.run(cfg, [str(d["capfilt"])], str(d["repretrain"]), stage="repretrain")
        return train_result(res, d["repretrain"])

    def do_evaluate() -> str:
        res = evaluate.run(cfg, {"pretrain": str(d["pretrain"]), "repretrain": str(d["repretrain"])},
                           str(d["test"]), str(d["evaluate"]), capfilt=str(d["capfilt"]))
        _require(d["evaluate"] / "metrics.json")
        m = res.metrics["models"]
        return "; ".join(f"{name}: mean R@1 {v['mean_r1']:.1f}, CIDEr {v['cider']:.1f}" for name, v in m.items())

    with environment(BLIP_TRACKING="0"):
        yield stage("ingest", do_ingest)
        yield stage("pretrain", do_pretrain)
        yield stage("finetune captioner", lambda: do_finetune("captioner"))
        yield stage("finetune filter", lambda: do_finetune("filter"))
        yield stage("capfilt", do_capfilt)
        yield stage("repretrain", do_repretrain)
        yield stage("evaluate", do_evaluate)


def pipeline_device() -> str:
    """The device the stages pick for themselves (they use CUDA whenever it is visible)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------ vs transformers


def compare_image_size(args) -> int:
    from blip_core import model_preset

    if args.caption_image_size:
        return args.caption_image_size
    return 384 if args.caption_preset == "base" else model_preset(args.caption_preset).vision.image_size


def compare_names(args) -> list[str]:
    size = compare_image_size(args)
    head = f"vs transformers ({args.caption_preset}, {size} px, fp32)"
    units = {"greedy": f"{args.caption_batch} images", "beam3": f"{args.caption_batch} images",
             "itm": f"1 image x {args.itm_texts} texts"}
    return [f"{head}: export weights"] + [f"{head}: {COMPARE_TASKS[t]}, {units[t]}" for t in COMPARE_TASKS]


@contextlib.contextmanager
def strict_fp32():
    """No TF32 in CUDA matmuls and convolutions (cuDNN allows it by default), so fp32 means fp32 on both sides."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def check_transformers(args, device: torch.device, root: Path) -> Iterator[Row]:
    from blip_core.generation import prompt_token_ids
    from blip_core.tokenizer import BlipTokenizer

    names = compare_names(args)
    size = compare_image_size(args)
    work = root / "compare"
    t = time.perf_counter()
    caption.prepare(work, args.caption_preset, size)
    yield Row(names[0], PASS, time.perf_counter() - t, "random weights saved by blip_core and as HF (save_hf)")
    tok = BlipTokenizer.from_dir(work / "vocab")
    opts = SimpleNamespace(repeats=args.repeats, batch=args.caption_batch, texts=args.itm_texts)
    for name, task in zip(names[1:], COMPARE_TASKS):
        t = time.perf_counter()
        try:
            with strict_fp32():
                speed = caption.timing(task, work, tok, opts, image_size=size, device=device)
        except CheckTimeout:
            raise
        except Exception as exc:  # noqa: BLE001 - one row's failure must not stop the others
            yield Row(name, FAIL, time.perf_counter() - t, one_line(exc))
            continue
        ours, ref = speed["blip"], speed["hf"]
        if task == "itm":
            d_itm = (torch.tensor(ours["itm"]) - torch.tensor(ref["itm"])).abs().max().item()
            d_itc = (torch.tensor(ours["itc"]) - torch.tensor(ref["itc"])).abs().max().item()
            same = d_itm <= ITM_ATOL and d_itc <= ITM_ATOL
            unit, outputs = "pairs/s", f"max abs diff ITM {d_itm:.1e}, ITC {d_itc:.1e} (tolerance {ITM_ATOL:g})"
        else:
            plen = len(prompt_token_ids(tok, caption.PROMPT))
            a = caption._trim(ours["tokens"], plen, tok.sep_id)
            b = caption._trim(ref["tokens"], plen, tok.sep_id)
            same = a == b
            differ = sum(x != y for x, y in zip(a, b))
            unit, outputs = "images/s", ("identical captions" if same else f"{differ} of {len(a)} captions differ")
        result = (f"blip_core {ours['rate']:.2f} {unit}, transformers {ref['rate']:.2f} {unit}, "
                  f"{ours['rate'] / ref['rate']:.2f}x; {outputs}")
        yield Row(name, PASS if same else FAIL, time.perf_counter() - t, result)


# ------------------------------------------------------------------------------------ running and printing


def run_section(names: list[str], rows_of: Callable[[float], Iterator[Row]], limit_s: float) -> list[Row]:
    """Collect a section's rows (``rows_of(deadline)``, ``time.time()`` seconds); an exception or the time limit
    fails the row in progress, and the rows after it are not run."""
    rows: list[Row] = []
    if limit_s < 5:
        return [Row(n, FAIL, 0.0, "not run: the time budget is spent") for n in names]
    t = time.perf_counter()
    try:
        with time_limit(limit_s):
            for row in rows_of(time.time() + limit_s):
                rows.append(row)
                print(f"[gpu_check] {row.status} {row.check}: {row.result}", file=sys.stderr, flush=True)
                t = time.perf_counter()
    except Exception as exc:  # noqa: BLE001 - every failure becomes a row; the table is always printed
        reason = one_line(exc)
        done = len(rows)
        if done < len(names):
            rows.append(Row(names[done], FAIL, time.perf_counter() - t, reason))
            print(f"[gpu_check] FAIL {names[done]}: {reason}", file=sys.stderr, flush=True)
        rows += [Row(n, FAIL, 0.0, f"not run: {names[done]} failed") for n in names[done + 1:]]
    return rows


def format_table(rows: list[Row]) -> str:
    lines = ["| check | status | seconds | result |", "|---|---|---:|---|"]
    for r in rows:
        result = r.result.replace("|", "/")
        lines.append(f"| {r.check} | {r.status} | {r.seconds:.1f} | {result} |")
    return "\n".join(lines)


def describe(device: torch.device) -> str:
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
    return (f"device {device} ({what}), {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}")


# Defaults of the size options, and those of --quick (a CPU smoke run); an option given explicitly wins.
SIZES = {"preset": "base", "batch_size": 64, "steps": 20, "warmup": 3, "caption_preset": "base",
         "caption_batch": 8, "itm_texts": 128, "repeats": 3}
QUICK_SIZES = {"preset": "tiny", "batch_size": 4, "steps": 2, "warmup": 1, "caption_preset": "tiny",
               "caption_batch": 2, "itm_texts": 8, "repeats": 1}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from blip_core.config import MODEL_PRESETS

    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    p.add_argument("--preset", "--train-preset", dest="preset", choices=MODEL_PRESETS,
                   help="pre-training step model (default base)")
    p.add_argument("--image-size", type=int, default=0, help="pre-training image size (default: the preset's)")
    p.add_argument("--batch-size", type=int, help="pre-training pairs per step (default 64)")
    p.add_argument("--steps", type=int, help="timed pre-training steps after --warmup (default 20)")
    p.add_argument("--warmup", type=int, help="untimed pre-training steps first (default 3)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                   help="pre-training step autocast (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s for MFU (default: by GPU kind)")
    p.add_argument("--caption-preset", choices=MODEL_PRESETS, help="model of the transformers comparison "
                   "(default base)")
    p.add_argument("--caption-image-size", type=int, default=0, help="default: 384 for base, else the preset's")
    p.add_argument("--caption-batch", type=int, help="images captioned per run (default 8)")
    p.add_argument("--itm-texts", type=int, help="texts re-ranked against one image (default 128)")
    p.add_argument("--repeats", type=int, help="timed runs per side, the fastest kept (default 3)")
    p.add_argument("--skip", nargs="*", choices=("pretrain", "pipeline", "compare"), default=[],
                   help="sections to leave out")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of the whole run (s)")
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke-run sizes: " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                           for k, v in QUICK_SIZES.items()))
    args = p.parse_args(argv)
    for key, value in (QUICK_SIZES if args.quick else SIZES).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("batch_size", "steps", "caption_batch", "itm_texts", "repeats"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must be at least 0")
    return args


def choose_device(args: argparse.Namespace) -> torch.device:
    """Resolve ``args.device`` and ``args.precision``; ``--device cpu`` also hides the GPUs from the stages."""
    if args.device == "cpu" and not torch.cuda.is_initialized():
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the stages pick their device themselves
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but CUDA is not available")
    if args.precision is None:
        args.precision = "bf16" if args.device == "cuda" else "fp32"
    return torch.device(args.device)


def main(argv: list[str] | None = None) -> int:
    start = time.time()
    args = parse_args(argv)
    try:
        device = choose_device(args)
    except ValueError as exc:
        print(f"gpu_check: error: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    deadline = start + args.budget_s
    print(f"[gpu_check] {describe(device)}", file=sys.stderr, flush=True)

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="blip-gpu-check-") as tmp:
        root = Path(tmp)
        sections = [
            ("pretrain", [pretrain_name(args)], lambda end: check_pretrain(args, device, end)),
            ("pipeline", [f"pipeline ({pipeline_device()}, tiny): {s}" for s in PIPELINE_STAGES],
             lambda end: check_pipeline(args, device, root)),
            ("compare", compare_names(args), lambda end: check_transformers(args, device, root)),
        ]
        for name, names, rows_of in sections:
            if name not in args.skip:
                rows += run_section(names, rows_of, min(SECTION_CAPS_S[name], deadline - time.time()))
                gc.collect()  # a section's models and optimizer state go before the next one starts
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    print(f"GPU check: {describe(device)}; total {time.time() - start:.0f} s")
    print()
    print(format_table(rows))
    failed = [r for r in rows if r.status != PASS]
    if failed:
        print(f"\n{len(failed)} of {len(rows)} rows failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
