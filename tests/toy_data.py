"""Tiny-config overrides shared by the stage tests (the fixtures that use them live in conftest.py)."""

TINY = ["model.preset=tiny", "pretrain.batch_size=8", "pretrain.warmup_steps=2", "pretrain.log_every=1",
        "finetune_captioner.batch_size=8", "finetune_filter.batch_size=8", "data.shuffle_buffer=50"]
