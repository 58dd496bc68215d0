"""Session fixtures: small toy-web datasets ingested once and shared by the stage tests."""

from __future__ import annotations

import pytest

from blip_core.config import load_config
from components import ingest

TINY = ["model.preset=tiny", "pretrain.batch_size=8", "pretrain.warmup_steps=2", "pretrain.log_every=1",
        "finetune_captioner.batch_size=8", "finetune_filter.batch_size=8", "data.shuffle_buffer=50"]


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    """``{"web": dir, "human": dir, "test": dir}`` of small toy-web datasets."""
    root = tmp_path_factory.mktemp("toydata")
    cfg = load_config(None, ["ingest.resolution=32"])
    out = {}
    for split, n in (("web", 64), ("human", 24), ("test", 12)):
        out[split] = str(root / split)
        ingest.run(cfg, f"toyweb://?split={split}&n={n}&seed=1&size=32", out[split], progress=False)
    return out


@pytest.fixture
def no_tracking(monkeypatch):
    monkeypatch.setenv("BLIP_TRACKING", "0")
