"""Helpers shared by the benchmarks: process memory, device timing, random pre-training batches and one step,
a time limit for a section of checks and one-line error descriptions."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import threading
import time
from collections.abc import Iterator

import torch


def rss_mib() -> float:
    """This process's resident set size now, in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM), so a later peak excludes what came before."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """Peak RSS since the last reset (VmHWM), else since process start (ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on CPU), so wall-clock timings cover it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device | str, precision: str):
    """bf16 autocast on the device's type for ``precision == "bf16"``, else a no-op context."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def random_pretrain_batches(batch_size: int, image_size: int, vocab_size: int, *, text_len: int = 30,
                            device: torch.device | str = "cpu", seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Endless random pre-training batches: images, captions of ``text_len`` tokens ([CLS] ... [SEP]).

    Token ids follow a BERT vocabulary (``[CLS]`` 101, ``[SEP]`` 102, words above 103) of ``vocab_size``
    entries whose last two are ``[DEC]`` and ``[ENC]`` (see :func:`bert_special_ids`).
    """
    from blip_core.seeding import make_generator

    g = make_generator(device, seed)
    while True:
        ids = torch.randint(104, vocab_size - 2, (batch_size, text_len), generator=g, device=device)
        ids[:, 0] = 101
        ids[:, -1] = 102
        yield {"image": torch.randn(batch_size, 3, image_size, image_size, generator=g, device=device),
               "input_ids": ids, "attention_mask": torch.ones_like(ids)}


def bert_special_ids(vocab_size: int):
    """The objectives' special ids for the vocabulary of :func:`random_pretrain_batches`."""
    from blip_core.objectives import SpecialIds

    return SpecialIds(cls=101, enc=vocab_size - 1, dec=vocab_size - 2, pad=0)


def pretrain_step(objective, optimizer, batch: dict[str, torch.Tensor], *, alpha: float = 0.4,
                  precision: str = "fp32"):
    """One full pre-training step as the training loop runs it: ITC + ITM + LM forward (under ``precision``),
    backward, AdamW step, temperature clamp, momentum update, enqueue. Returns the objective's output."""
    device = batch["image"].device
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, precision):
        out = objective(batch["image"], batch["input_ids"], batch["attention_mask"], alpha=alpha)
    out.loss.backward()
    optimizer.step()
    objective.model.clamp_temp()
    objective.momentum_update()
    objective.enqueue(out)
    return out


def timed(fn, device: torch.device | str):
    """``fn()``'s result and its wall-clock seconds, the device's queued work included."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def fastest_alternating(runs: dict, repeats: int, device: torch.device | str) -> dict[str, tuple[float, object]]:
    """Time two sides' no-argument runs in turn (order swapped every repeat, so load from other processes hits
    both alike); per side, the fastest ``(seconds, output)`` of ``repeats``."""
    a, b = runs
    best: dict[str, tuple[float, object]] = {}
    for r in range(repeats):
        for side in ((a, b) if r % 2 == 0 else (b, a)):
            out, seconds = timed(runs[side], device)
            if side not in best or seconds < best[side][0]:
                best[side] = (seconds, out)
    return best


class CheckTimeout(Exception):
    """A section ran past its share of the time budget."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise :class:`CheckTimeout` in this (main) thread after ``seconds``; elsewhere no limit is enforced."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise CheckTimeout(f"stopped at the section's time limit ({seconds:.0f} s)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, at most 200 characters."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
