import dataclasses
import logging
import shutil
from pathlib import Path

import pytest
import torch
from blip_testing import (
    ACCUM_BATCH,
    GRAD_ACCUM_CFG,
    IDS,
    RowSource,
    lm_objective,
    tiny_batch,
    tiny_model,
    torchrun2,
)

from blip_core.config import TrainConfig
from blip_core.objectives import PretrainObjective
from blip_core.train.checkpoint import CheckpointMissing, is_complete, latest_checkpoint, load_training_state
from blip_core.train.loop import TrainingDiverged, train
from blip_core.train.optim import alpha_at, build_optimizer, learning_rate


class FixedSource:
    """A deterministic in-memory batch source: batch i of epoch e depends only on (e, i)."""

    def __init__(self, n_batches=6, batch=4, poison_at=None):
        self.n, self.b, self.poison_at = n_batches, batch, poison_at

    @property
    def batches_per_epoch(self):
        return self.n

    def batches(self, epoch, skip=0):
        for i in range(skip, self.n):
            image, ids, mask = tiny_batch(batch=self.b, seed=100 * epoch + i)
            if self.poison_at == (epoch, i):
                image = image * float("nan")
            yield {"image": image, "input_ids": ids, "attention_mask": mask}


CFG = TrainConfig(epochs=2, batch_size=4, lr=1e-3, warmup_steps=3, warmup_lr=1e-5, log_every=1)


def _run(tmp_path, cfg=CFG, source=None, resume=True, stem="patch", **kw):
    obj = PretrainObjective(tiny_model(seed=0, stem=stem), IDS, queue_size=10)
    opt = build_optimizer(obj, cfg)
    res = train(obj, opt, cfg, source or FixedSource(), checkpoint_dir=tmp_path, progress=False, resume=resume, **kw)
    return obj, opt, res


def test_schedules():
    cfg = TrainConfig(lr=3e-4, warmup_lr=1e-6, warmup_steps=10, lr_decay_rate=0.9, min_lr=1e-6)
    assert learning_rate(cfg, 0, 0) == pytest.approx(1e-6)
    assert learning_rate(cfg, 5, 0) == pytest.approx(1e-6 + (3e-4 - 1e-6) / 2)
    assert learning_rate(cfg, 50, 0) == pytest.approx(3e-4)
    assert learning_rate(cfg, 500, 3) == pytest.approx(3e-4 * 0.9**3)
    cos = TrainConfig(lr=1e-5, min_lr=0.0, schedule="cosine", epochs=4, warmup_steps=0)
    assert [learning_rate(cos, 100, e) for e in range(5)] == pytest.approx(
        [1e-5, 0.5 * 1e-5 * (1 + 0.7071067811865476), 0.5e-5, 0.5 * 1e-5 * (1 - 0.7071067811865476), 0.0])
    assert alpha_at(0.4, 2, 0, 0, 10) == 0.0
    assert alpha_at(0.4, 2, 1, 0, 10) == pytest.approx(0.2)
    assert alpha_at(0.4, 2, 3, 5, 10) == pytest.approx(0.4)


def test_train_logs_and_checkpoints(tmp_path):
    logs = []
    obj, _, res = _run(tmp_path, log_fn=lambda step, m: logs.append((step, m)))
    assert res.position.step == 12 and res.position.epoch == 2
    assert [s for s, _ in logs] == list(range(1, 13))
    assert {"loss", "loss_itc", "loss_itm", "loss_lm", "lr", "alpha", "temp", "pairs_per_second"} <= set(logs[0][1])
    assert logs[0][1]["lr"] == pytest.approx(1e-5) and logs[0][1]["alpha"] == 0.0
    assert latest_checkpoint(tmp_path) == res.checkpoint
    assert 0.001 <= float(obj.model.temp) <= 0.5


@pytest.mark.parametrize("stem", ["patch", "conv"])  # conv: batch-norm statistics are state too
def test_resume_is_bit_identical(tmp_path, stem):
    """Stop after 5 steps (mid-epoch) from a checkpoint, resume, and compare to one uninterrupted run."""
    ref, _, _ = _run(tmp_path / "ref", stem=stem)
    cfg_stop = dataclasses.replace(CFG, max_steps=5)
    _run(tmp_path / "resumed", cfg=cfg_stop, stem=stem)
    resumed, _, res = _run(tmp_path / "resumed", stem=stem)
    assert res.resumed_from is not None and res.position.step == 12
    for (n, a), (_, b) in zip(ref.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n


def test_nan_loss_stops_with_clear_message(tmp_path):
    cfg = dataclasses.replace(CFG, checkpoint_every=2)
    with pytest.raises(TrainingDiverged, match=r"step 3 .*last good checkpoint: .*step-00000002"):
        _run(tmp_path, cfg=cfg, source=FixedSource(poison_at=(0, 3)))


def test_checkpoint_round_trip_restores_optimizer(tmp_path):
    obj, opt, res = _run(tmp_path, cfg=dataclasses.replace(CFG, max_steps=2))
    obj2 = PretrainObjective(tiny_model(seed=9), IDS, queue_size=10)
    opt2 = build_optimizer(obj2, CFG)
    pos, state = load_training_state(res.checkpoint, obj2, opt2)
    assert pos.step == 2 and pos.batch_in_epoch == 2
    for (n, a), (_, b) in zip(obj.state_dict().items(), obj2.state_dict().items()):
        assert torch.equal(a, b), n
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"])


def _two_checkpoints(tmp_path):
    """A run stopped at step 4 with checkpoints at steps 2 and 4 (latest.json -> step 4)."""
    _run(tmp_path, cfg=dataclasses.replace(CFG, max_steps=4, checkpoint_every=2))
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000004"
    return tmp_path / "step-00000002", tmp_path / "step-00000004"


def test_crash_after_old_checkpoint_removed_resumes_from_newest_complete(tmp_path, caplog):
    """The crash window of a save: latest.json names a checkpoint whose directory is gone (removed before the
    new one was renamed into place), a half-written temporary directory is left. Resuming must continue from
    the newest complete checkpoint, not restart from step 0."""
    older, newest = _two_checkpoints(tmp_path)
    shutil.rmtree(newest)
    (tmp_path / ".step-00000004.tmp-999").mkdir()
    (tmp_path / ".step-00000004.tmp-999" / "objective.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) == older
    _, _, res = _run(tmp_path)
    assert res.resumed_from == older and res.position.step == 12
    assert "resuming from step-00000002" in caplog.text


def test_crash_with_checkpoint_renamed_aside_restores_it(tmp_path):
    """A crash between renaming an existing step directory aside and renaming the new one into place."""
    _, newest = _two_checkpoints(tmp_path)
    aside = tmp_path / ".step-00000004.old-999"
    newest.rename(aside)
    assert latest_checkpoint(tmp_path) == newest and not aside.exists()


def test_crash_before_latest_json_written_uses_the_new_checkpoint(tmp_path):
    _two_checkpoints(tmp_path)
    (tmp_path / "latest.json").unlink()
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000004"


def test_latest_json_naming_a_missing_checkpoint_fails_loudly(tmp_path):
    older, newest = _two_checkpoints(tmp_path)
    shutil.rmtree(older)
    shutil.rmtree(newest)
    with pytest.raises(CheckpointMissing, match="step-00000004"):
        latest_checkpoint(tmp_path)
    with pytest.raises(CheckpointMissing):
        _run(tmp_path)


def test_saving_a_step_again_replaces_it_and_leaves_nothing_behind(tmp_path):
    _run(tmp_path, cfg=dataclasses.replace(CFG, max_steps=2))
    _run(tmp_path, cfg=dataclasses.replace(CFG, max_steps=2), resume=False)  # rewrites step-00000002
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-00000002"]
    assert is_complete(tmp_path / "step-00000002")


# ------------------------------------------------------------------ gradient accumulation, clipping, weight decay


def _one_step(cfg, micro_batches, tmp_path):
    obj = lm_objective()
    opt = build_optimizer(obj, cfg)
    train(obj, opt, cfg, RowSource(micro_batches), checkpoint_dir=tmp_path, progress=False)
    return obj


def _grads(obj):
    return {n: p.grad for n, p in obj.model.named_parameters() if p.grad is not None}


def test_grad_accum_equals_one_big_batch(tmp_path):
    """4 micro-batches of 2 accumulated into one step give the gradient and the step of one batch of 8."""
    big = _one_step(dataclasses.replace(GRAD_ACCUM_CFG, grad_accum=1, batch_size=ACCUM_BATCH),
                    [list(range(ACCUM_BATCH))], tmp_path / "big")
    accum = _one_step(dataclasses.replace(GRAD_ACCUM_CFG, grad_accum=4),
                      [[0, 1], [2, 3], [4, 5], [6, 7]], tmp_path / "accum")
    want, got = _grads(big), _grads(accum)
    assert want.keys() == got.keys() and len(want) > 10
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-7, msg=n)
    for (n, a), (_, b) in zip(big.model.named_parameters(), accum.model.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.slow  # two processes
def test_grad_accum_with_ddp_no_sync_equals_one_big_batch(tmp_path):
    """2 gloo ranks x grad_accum 2 (the first micro-batch under DDP ``no_sync``, the second synchronised): every
    rank ends the step with the gradient and the weights of one batch of 8 in one process."""
    torchrun2(Path(__file__).parent / "scripts" / "ddp_grad_accum.py", tmp_path)
    big = _one_step(dataclasses.replace(GRAD_ACCUM_CFG, grad_accum=1, batch_size=ACCUM_BATCH),
                    [list(range(ACCUM_BATCH))], tmp_path / "big")
    want = _grads(big)
    weights = dict(big.model.named_parameters())
    for rank in range(2):
        ddp = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert ddp["grads"].keys() == want.keys()
        for n, g in ddp["grads"].items():
            torch.testing.assert_close(g, want[n], rtol=1e-4, atol=1e-7, msg=f"rank {rank}: {n}")
        for n, w in ddp["weights"].items():
            torch.testing.assert_close(w, weights[n], rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {n}")


def test_grad_clip_bounds_the_global_gradient_norm(tmp_path):
    def norm(obj):
        return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in _grads(obj).values()])))

    rows = [[0, 1], [2, 3]]
    free = norm(_one_step(GRAD_ACCUM_CFG, rows, tmp_path / "free"))
    clip = free / 10
    clipped_obj = _one_step(dataclasses.replace(GRAD_ACCUM_CFG, grad_clip=clip), rows, tmp_path / "clipped")
    assert norm(clipped_obj) == pytest.approx(clip, rel=1e-4)
    # clipping scales every gradient by the same factor, after accumulation
    ref = _grads(_one_step(GRAD_ACCUM_CFG, rows, tmp_path / "ref"))
    for n, g in _grads(clipped_obj).items():
        torch.testing.assert_close(g, ref[n] * (clip / free), rtol=1e-3, atol=1e-8, msg=n)
    # a bound above the norm changes nothing
    loose = _grads(_one_step(dataclasses.replace(GRAD_ACCUM_CFG, grad_clip=free * 2), rows, tmp_path / "loose"))
    for n, g in loose.items():
        assert torch.equal(g, ref[n]), n


def test_no_decay_groups_exempt_norms_biases_temperature_and_embeddings():
    """``no_decay_norm_bias``: every 1-d parameter, ``temp`` and the named embeddings get no weight decay, also
    under a DDP-style ``module.`` prefix; a step with zero gradients then moves only the decayed weights."""
    obj = PretrainObjective(tiny_model(), IDS, queue_size=8)
    names = obj.model.no_weight_decay()
    cfg = dataclasses.replace(CFG, no_decay_norm_bias=True, weight_decay=0.5, lr=0.1)
    wrapped = torch.nn.Module()
    wrapped.module = obj  # parameter names as under DistributedDataParallel: module.model.<name>
    for module in (obj, wrapped):
        opt = build_optimizer(module, cfg, no_decay_names=names)
        decay, no_decay = opt.param_groups
        assert decay["weight_decay"] == 0.5 and no_decay["weight_decay"] == 0.0
        by_id = {id(p): n for n, p in obj.model.named_parameters()}
        exempt = {by_id[id(p)] for p in no_decay["params"]}
        decayed = {by_id[id(p)] for p in decay["params"]}
        trainable = {n for n, p in obj.model.named_parameters() if p.requires_grad}
        assert exempt | decayed == trainable and not exempt & decayed
        assert exempt == {n for n in trainable if dict(obj.model.named_parameters())[n].ndim <= 1} | names
        assert {"temp", "visual_encoder.pos_embed", "visual_encoder.cls_token"} <= exempt
        assert "visual_encoder.patch_embed.proj.weight" in decayed
    before = {n: p.detach().clone() for n, p in obj.model.named_parameters()}
    opt = build_optimizer(obj, cfg, no_decay_names=names)
    for p in obj.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()
    for n, p in obj.model.named_parameters():
        if n in exempt:
            assert torch.equal(p, before[n]), n
        else:
            torch.testing.assert_close(p, before[n] * (1 - 0.1 * 0.5), msg=n)
    # without the option: one group, decay on everything (the official recipe)
    assert len(build_optimizer(obj, CFG, no_decay_names=names).param_groups) == 1


# ------------------------------------------------------------------ resume only onto the same config and data

RUN_CONFIG = {"pretrain": {"lr": 1e-3, "max_steps": 5}, "data_fingerprint": "aaaa"}


@pytest.mark.parametrize("change", [{"pretrain": {"lr": 2e-3, "max_steps": 5}},
                                    {"data_fingerprint": "bbbb"}], ids=["config", "data"])
def test_refuses_to_resume_after_a_config_or_data_change(tmp_path, caplog, change):
    """A checkpoint written with another config or other data is not resumed: the run starts over and ends
    with the weights of a fresh run."""
    cfg_stop = dataclasses.replace(CFG, max_steps=5)
    _run(tmp_path / "run", cfg=cfg_stop, config_dict=RUN_CONFIG)
    changed = {**RUN_CONFIG, **change}
    with caplog.at_level(logging.WARNING):
        resumed, _, res = _run(tmp_path / "run", config_dict=changed)
    assert res.resumed_from is None and res.position.step == 12
    assert "another config or other data" in caplog.text
    fresh, _, _ = _run(tmp_path / "fresh", config_dict=changed)
    for (n, a), (_, b) in zip(fresh.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n


def test_resumes_when_only_the_run_length_changes(tmp_path):
    _run(tmp_path, cfg=dataclasses.replace(CFG, max_steps=5), config_dict=RUN_CONFIG)
    longer = {**RUN_CONFIG, "pretrain": {"lr": 1e-3, "max_steps": 0}}
    _, _, res = _run(tmp_path, config_dict=longer)
    assert res.resumed_from is not None and res.resumed_from.name == "step-00000005"
