import dataclasses
import shutil

import pytest
import torch
from blip_testing import IDS, tiny_batch, tiny_model

from blip_core.config import TrainConfig
from blip_core.objectives import PretrainObjective
from blip_core.train.checkpoint import CheckpointMissing, is_complete, latest_checkpoint, load_checkpoint_into
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
    pos, state = load_checkpoint_into(res.checkpoint, obj2, opt2)
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
