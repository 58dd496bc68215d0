"""Typed configuration: one dataclass tree, loaded from ``params.yaml`` with dotted overrides.

Every section of ``params.yaml`` maps to one dataclass below. Defaults live only here. Unknown keys
and values of the wrong type raise :class:`ConfigError` naming the offending key, e.g.::

    cfg = load_config("params.yaml", ["pretrain.lr=1e-4", "model.preset=tiny"])

The ``model`` section starts from a named preset (``tiny``, ``toy``, ``base``, ``large``); any other key
given in the section overrides the preset's value.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from blip_core.constants import CAPTION_MAX_WORDS, DEFAULT_PROMPT, PRETRAIN_TEXT_TOKENS, RETRIEVAL_TEXT_TOKENS
from blip_core.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


# ---- Model ---------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class VisionConfig:
    """ViT image encoder (timm ``VisionTransformer``)."""

    image_size: int = 224  # pixels per side
    patch_size: int = 16  # pixels per side of a patch (one token)
    width: int = 768  # token width
    depth: int = 12  # transformer blocks
    heads: int = 12  # attention heads per block
    mlp_ratio: float = 4.0  # MLP hidden width / token width
    ln_eps: float = 1e-6  # LayerNorm epsilon
    drop_path_rate: float = 0.0
    grad_ckpt_layers: int = 0  # checkpoint the last k blocks (0 = off)
    # "patch": the paper's linear patchify; "conv": 3x3 convolutions and 2x2 max-pools give the same token grid
    # (Xiao et al. 2021), which a small ViT trained from scratch needs to see shapes (docs/results.md).
    stem: Literal["patch", "conv"] = "patch"


@dataclass(kw_only=True)
class TextConfig:
    """MED text transformer (post-LN BERT with cross-attention in every layer)."""

    vocab_size: int = 30524  # 0 = take it from the tokenizer when building a model from scratch
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position: int = 512
    ln_eps: float = 1e-12
    dropout: float = 0.1  # hidden dropout: embeddings and every sublayer's output (BERT's hidden_dropout_prob)
    attention_dropout: float | None = None  # on attention probabilities (BERT's attention_probs_dropout_prob)
    # Std of the normal initialisation of every Linear/Embedding weight (BERT's ``initializer_range``).
    # BERT's 0.02 suits 768 wide models initialised from a checkpoint; a narrow MED trained from scratch
    # needs about 1/sqrt(hidden_size), or its [CLS]/[ENC] outputs barely depend on the text at first.
    init_std: float = 0.02
    grad_ckpt_layers: int = 0  # recompute the last k layers' activations in backward (0 = off; memory for time)

    @property
    def attention_rate(self) -> float:  # ``attention_dropout``, or ``dropout`` when that is unset
        return self.dropout if self.attention_dropout is None else self.attention_dropout


@dataclass(kw_only=True)
class ModelConfig:
    """The whole BLIP model: ViT + MED + projections, ITM head, momentum and queue sizes."""

    preset: str = "toy"
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 256  # ITC projection size
    queue_size: int = 57600
    momentum: float = 0.995
    alpha: float = 0.4  # momentum-distillation weight (ramped by the training loop)
    temp: float = 0.07  # initial ITC temperature, clamped to [0.001, 0.5]
    max_text_len: int = PRETRAIN_TEXT_TOKENS  # tokens per caption in pre-training
    tokenizer: str = "corpus"  # "corpus" (build WordPiece from captions) or a local/s3 HF tokenizer dir
    corpus_vocab_size: int = 1000  # WordPiece vocabulary size when the tokenizer is built from the corpus


def _preset(name: str) -> ModelConfig:
    if name == "tiny":  # unit tests: runs in milliseconds
        return ModelConfig(
            preset="tiny",
            vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=2, heads=2),
            text=TextConfig(vocab_size=0, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                            max_position=64),
            embed_dim=16, queue_size=64, max_text_len=24,
        )
    if name == "toy":  # the embedded CPU demo: 64 px toy-web images, MED trained from scratch in minutes
        return ModelConfig(
            preset="toy",
            vision=VisionConfig(image_size=64, patch_size=8, width=128, depth=4, heads=2),
            text=TextConfig(vocab_size=0, hidden_size=128, num_layers=3, num_heads=2, intermediate_size=512,
                            max_position=64, init_std=0.088),
            embed_dim=128, queue_size=1024, max_text_len=30, momentum=0.99,
        )
    if name == "base":  # ViT-B/16 + BERT-base, as the paper (252M parameters)
        return ModelConfig(preset="base", tokenizer="bert-base-uncased")
    if name == "large":  # ViT-L/16 (drop path 0.1 as the official code), BERT-base text with 1024-wide cross-attention
        return ModelConfig(preset="large", tokenizer="bert-base-uncased",
                           vision=VisionConfig(width=1024, depth=24, heads=16, drop_path_rate=0.1))
    raise ConfigError(f"model.preset: unknown preset {name!r}; choose one of {', '.join(MODEL_PRESETS)}")


MODEL_PRESETS = ("tiny", "toy", "base", "large")


def model_preset(name: str) -> ModelConfig:
    """Return a fresh :class:`ModelConfig` for a named preset (``tiny``, ``toy``, ``base``, ``large``)."""
    return _preset(name)


# ---- Data and stages -----------------------------------------------------------------------------


@dataclass(kw_only=True)
class DataConfig:
    """How training/evaluation data is read and augmented."""

    # Resolution of fine-tuning, CapFilt and evaluation; a checkpoint saved at another size is loaded with its
    # ViT position embeddings interpolated bicubically (paper: pre-train at 224, fine-tune at 384).
    # 0 = each checkpoint's own. Pre-training runs at model.vision.image_size (or its --init checkpoint's).
    image_size: int = 0
    max_words: int = CAPTION_MAX_WORDS  # pre_caption truncation
    num_workers: int = 0  # DataLoader worker processes per rank (0 = load in the training process)
    shuffle_buffer: int = 1000  # samples held in the shuffle buffer of each (rank, worker) stream
    min_scale_pretrain: float = 0.2  # RandomResizedCrop lower scale at pre-training
    min_scale_finetune: float = 0.5  # ... and at fine-tuning
    randaugment: bool = True  # RandAugment(2, 5) in train transforms
    # train on what is left when shards listed in a dataset's manifest are missing or damaged (counted and
    # logged as lost_samples); false = refuse to start
    allow_partial: bool = False
    verify_sha256: bool = False  # also check every shard's sha256 against the manifest when opening (reads all)


@dataclass(kw_only=True)
class IngestConfig:
    """Ingest stage: checks, cleaning and sharding of raw image-text pairs."""

    source: str = "toyweb://?split=web&n=2000&noise=0.3&seed=0"  # used when --source is not given
    image_root: str = ""  # image paths of a .json annotation source are relative to this ("" = the file's dir)
    resolution: int = 64  # stored images: short side downscaled to this, aspect kept (never upscaled); 0 = keep
    min_size: int = 16  # reject images with a side shorter than this (pixels)
    max_pixels: int = 64_000_000  # reject images with more pixels than this (decompression bombs)
    image_format: Literal["jpg", "png"] = "jpg"  # stored encoding; a JPEG needing no resize is kept byte for byte
    jpeg_quality: int = 95  # quality when (re-)encoding JPEG
    shard_size: int = 1000  # samples per output shard
    max_words: int = CAPTION_MAX_WORDS  # pre_caption truncation of stored captions
    dedupe: bool = True  # drop exact duplicates (same image bytes and same cleaned caption)
    caption_source: Literal["web", "human", "synthetic"] = "web"  # json "source" when the input does not say
    fetch_threads: int = 8  # parallel image reads for JSONL/CSV manifests (S3 keys, URLs, files)
    # largest tar member or manifest image read (bytes); bigger ones are rejected unread ("too_large")
    max_member_bytes: int = 67_108_864
    allow_paths_outside: bool = False  # manifest image paths may leave the manifest's directory (or s3 prefix)
    allow_private_urls: bool = False  # manifest image URLs may reach private, loopback or link-local addresses


@dataclass(kw_only=True)
class SourcesConfig:
    """Where the pipeline's raw data comes from (toy-web URIs, shard directories, manifests; local or s3)."""

    web: str = "toyweb://?split=web&n=3000&noise=0.3&seed=0"  # noisy web pairs
    human: str = "toyweb://?split=human&n=500&seed=0"  # clean human-annotated pairs (several captions each)
    test: str = "toyweb://?split=test&n=200&seed=0"  # clean held-out test split
    # optional: a few hundred web pairs labelled by hand (sample json "noise": null when the caption is right,
    # a reason when it is wrong) on which CapFilt chooses its threshold; "" = use capfilt.threshold
    calibration: str = ""
    # VQA data: questions about images with annotator answers (toy-web, or the official VQA annotation .json)
    vqa_train: str = "toyweb://?split=vqa_train&n=500&seed=0"
    vqa_test: str = "toyweb://?split=vqa_test&n=200&seed=0"


@dataclass(kw_only=True)
class TrainConfig:
    """One training stage (pre-train, fine-tune captioner, fine-tune filter)."""

    epochs: int = 20
    max_steps: int = 0  # 0 = run all epochs; otherwise stop after this many optimizer steps
    batch_size: int = 75  # per process
    lr: float = 3e-4
    min_lr: float = 1e-6
    warmup_lr: float = 1e-6
    warmup_steps: int = 3000
    lr_decay_rate: float = 0.9  # pre-train step decay per epoch (official code; the paper says 0.85)
    schedule: Literal["step", "cosine"] = "step"
    weight_decay: float = 0.05
    no_decay_norm_bias: bool = False
    grad_accum: int = 1
    grad_clip: float = 0.0  # 0 = off
    alpha_ramp_epochs: float = 2.0  # momentum-distillation alpha ramps over this many epochs
    checkpoint_every: int = 0  # steps; 0 = only at the end
    seed: int = 42
    compile: bool = False  # torch.compile the image and text encoders
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast on the training device (CUDA or CPU)
    prompt: str = ""  # captioner fine-tuning: DEFAULT_PROMPT
    # filter fine-tuning: draw ITM hard negatives from every rank's batch, not only the local one (the official
    # COCO retrieval setting; Flickr leaves it off)
    negative_all_rank: bool = False
    log_every: int = 10


def _finetune_defaults(prompt: str) -> TrainConfig:
    return TrainConfig(epochs=5, batch_size=32, lr=1e-5, warmup_steps=0, schedule="cosine", min_lr=0.0,
                       alpha_ramp_epochs=1.0, prompt=prompt)


@dataclass(kw_only=True)
class CapFiltConfig:
    """CapFilt: synthetic captions from the captioner, ITM filtering of web and synthetic captions."""

    num_captions: int = 1
    decoding: Literal["nucleus", "beam"] = "nucleus"
    top_p: float = 0.9
    num_beams: int = 3
    max_length: int = 30
    min_length: int = 10
    repetition_penalty: float = 1.1
    threshold: float = 0.5  # keep a caption when its ITM match probability is >= threshold
    # With a labelled calibration sample (blip capfilt --calibration, sources.calibration), the threshold is
    # chosen on it instead: the most wrong captions dropped while >= target_precision of the dropped are wrong.
    target_precision: float = 0.9
    batch_size: int = 64
    prompt: str = DEFAULT_PROMPT
    seed: int = 0


@dataclass(kw_only=True)
class EvalConfig:
    """Evaluation: retrieval (ITC top-k re-ranked by ITM) and captioning metrics."""

    k_test: int = 256  # ITC candidates per image (i2t) and per text (t2i) re-ranked by ITM (COCO: 256,
    # Flickr30k: 128); more than there are candidates means all of them
    batch_size: int = 64  # images/texts per encoder and captioning batch
    itm_batch_size: int = 256  # image-text pairs per ITM re-rank forward (at least one row's k_test candidates)
    num_beams: int = 3
    max_length: int = 20
    min_length: int = 5
    repetition_penalty: float = 1.0  # beam-search captions (official COCO: 1.0, NoCaps: 1.1)
    length_norm: Literal["current", "hf415"] = "current"  # finished-beam scoring: today's transformers, or
    # transformers 4.15 as the official code ran (blip_core.generation)
    prompt: str = DEFAULT_PROMPT
    metric: str = "mean_r1"  # the metric register compares against the champion
    max_text_len: int = RETRIEVAL_TEXT_TOKENS  # tokens per caption for retrieval (official retrieval uses 35)
    log_samples: int = 4  # test images logged to MLflow with each model's caption
    # VQA (blip evaluate --vqa): "rank" scores the answer list of the model's training data (the paper's
    # numbers), "generate" decodes free text (vqa_num_beams > 1: beam search, 1: greedy)
    vqa_inference: Literal["rank", "generate"] = "rank"
    vqa_k_test: int = 128  # rank: answers re-scored by their full loss after the first-token top-k
    vqa_num_beams: int = 3
    vqa_max_length: int = 10
    vqa_min_length: int = 1
    vqa_batch_size: int = 32  # questions per forward
    resume_dir: str = ""  # local directory keeping finished retrieval re-rank blocks; a re-run resumes from it


@dataclass(kw_only=True)
class Config:
    """The whole ``params.yaml``."""

    model: ModelConfig = field(default_factory=lambda: _preset("toy"))
    data: DataConfig = field(default_factory=DataConfig)
    sources: SourcesConfig = field(default_factory=SourcesConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    finetune_captioner: TrainConfig = field(default_factory=lambda: _finetune_defaults(DEFAULT_PROMPT))
    finetune_filter: TrainConfig = field(default_factory=lambda: _finetune_defaults(""))
    # the official VQA recipe (configs/vqa.yaml): 10 epochs, lr 2e-5 cosine to 0, batch 16 per GPU
    finetune_vqa: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=10, batch_size=16, lr=2e-5, warmup_steps=0, schedule="cosine", min_lr=0.0))
    capfilt: CapFiltConfig = field(default_factory=CapFiltConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)


# ---- Loading -------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it (ints are accepted as floats)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} does not match {_type_name(tp)}")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '1e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")  # pragma: no cover - schema bug


# Allowed ranges of numeric fields, per section class: ">=N", ">N", or an interval "[a, b)" (brackets closed,
# parentheses open). A value outside is a ConfigError naming the key, before any stage starts.
_RANGES: dict[str, dict[str, str]] = {
    "VisionConfig": {"image_size": ">=1", "patch_size": ">=1", "width": ">=1", "depth": ">=1", "heads": ">=1",
                     "mlp_ratio": ">0", "ln_eps": ">0", "drop_path_rate": "[0, 1)", "grad_ckpt_layers": ">=0"},
    "TextConfig": {"vocab_size": ">=0", "hidden_size": ">=1", "num_layers": ">=1", "num_heads": ">=1",
                   "intermediate_size": ">=1", "max_position": ">=2", "ln_eps": ">0", "dropout": "[0, 1)",
                   "attention_dropout": "[0, 1)", "init_std": ">0", "grad_ckpt_layers": ">=0"},
    "ModelConfig": {"embed_dim": ">=1", "queue_size": ">=1", "momentum": "[0, 1]", "alpha": "[0, 1]",
                    "temp": ">0", "max_text_len": ">=2", "corpus_vocab_size": ">=1"},
    "DataConfig": {"image_size": ">=0", "max_words": ">=1", "num_workers": ">=0", "shuffle_buffer": ">=0",
                   "min_scale_pretrain": "(0, 1]", "min_scale_finetune": "(0, 1]"},
    "IngestConfig": {"resolution": ">=0", "min_size": ">=0", "max_pixels": ">=1", "jpeg_quality": "[1, 100]",
                     "shard_size": ">=1", "max_words": ">=1", "fetch_threads": ">=1"},
    "TrainConfig": {"epochs": ">=1", "max_steps": ">=0", "batch_size": ">=1", "lr": ">0", "min_lr": ">=0",
                    "warmup_lr": ">=0", "warmup_steps": ">=0", "lr_decay_rate": "(0, 1]", "weight_decay": ">=0",
                    "grad_accum": ">=1", "grad_clip": ">=0", "alpha_ramp_epochs": ">=0", "checkpoint_every": ">=0",
                    "log_every": ">=1"},
    "CapFiltConfig": {"num_captions": ">=1", "top_p": "(0, 1]", "num_beams": ">=1", "max_length": ">=1",
                      "min_length": ">=0", "repetition_penalty": ">0", "threshold": "[0, 1]",
                      "target_precision": "(0, 1]", "batch_size": ">=1"},
    "EvalConfig": {"k_test": ">=1", "batch_size": ">=1", "itm_batch_size": ">=1", "num_beams": ">=1",
                   "vqa_k_test": ">=1", "vqa_num_beams": ">=1", "vqa_max_length": ">=1", "vqa_min_length": ">=0",
                   "vqa_batch_size": ">=1",
                   "max_length": ">=1", "min_length": ">=0", "max_text_len": ">=2", "log_samples": ">=0"},
}


def _in_range(value: float, spec: str) -> bool:
    if spec.startswith(">="):
        return value >= float(spec[2:])
    if spec.startswith(">"):
        return value > float(spec[1:])
    lo, hi = (float(x) for x in spec[1:-1].split(","))
    return (value >= lo if spec[0] == "[" else value > lo) and (value <= hi if spec[-1] == "]" else value < hi)


def _check_ranges(obj: Any, prefix: str) -> None:
    """Refuse numeric values outside their field's range and inconsistent pairs, naming the key."""
    for name, spec in _RANGES.get(type(obj).__name__, {}).items():
        value = getattr(obj, name)
        if value is not None and not _in_range(value, spec):  # None: an optional field left unset
            want = f"in {spec}" if spec[0] in "[(" else spec.replace(">=", ">= ").replace(">0", "> 0")
            raise ConfigError(f"{prefix}{name}: {value!r} is out of range (must be {want})")
    if hasattr(obj, "min_length") and hasattr(obj, "max_length") and obj.min_length > obj.max_length:
        raise ConfigError(f"{prefix}min_length: {obj.min_length} is larger than {prefix}max_length "
                          f"({obj.max_length})")
    for width, heads in (("width", "heads"), ("hidden_size", "num_heads")):
        if hasattr(obj, width) and hasattr(obj, heads) and getattr(obj, width) % getattr(obj, heads):
            raise ConfigError(f"{prefix}{width}: {getattr(obj, width)} is not divisible by {prefix}{heads} "
                              f"({getattr(obj, heads)})")
    if isinstance(obj, VisionConfig) and obj.patch_size > obj.image_size:
        raise ConfigError(f"{prefix}patch_size: {obj.patch_size} is larger than {prefix}image_size "
                          f"({obj.image_size})")


def _merge_into(obj: Any, values: dict, prefix: str) -> Any:
    """Return a copy of dataclass ``obj`` with ``values`` (a nested dict) applied on top."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    changes = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"{key}: unknown key (known: {', '.join(sorted(names))})")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: expected a mapping, got {type(v).__name__} {v!r}")
            current = getattr(obj, k)
            if tp is ModelConfig and "preset" in v:  # a preset replaces the whole section's starting point
                v = dict(v)
                preset = v.pop("preset")
                if not isinstance(preset, str):
                    raise ConfigError(f"{key}.preset: expected a string, got {preset!r}")
                current = _preset(preset)
            changes[k] = _merge_into(current, v, key + ".")
        else:
            changes[k] = _coerce(v, tp, key)
    merged = dataclasses.replace(obj, **changes)
    _check_ranges(merged, prefix)
    return merged


def _build(cls: type, values: dict, key: str) -> Any:
    prefix = f"{key}." if key else ""
    return _merge_into(cls(), values, prefix)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{dotted}: {p!r} is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``"a.b=value"`` into ``("a.b", value)`` with YAML typing of the value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. pretrain.lr=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def config_from_dict(tree: dict | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a :class:`Config` from a nested dict (the YAML content) and dotted overrides."""
    tree = dict(tree or {})
    if "model" in tree and tree["model"] is not None and not isinstance(tree["model"], dict):
        raise ConfigError("model: expected a mapping")
    tree = {k: (dict(v) if isinstance(v, dict) else v) for k, v in tree.items()}
    for ov in overrides:
        key, value = parse_override(ov)
        _set_dotted(tree, key, value)
    tree = {k: v for k, v in tree.items() if v is not None}
    return _build(Config, tree, "")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load ``params.yaml`` (or defaults when ``path`` is None) and apply dotted ``overrides``."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:  # one line: the problem and where, not PyYAML's multi-line excerpt
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            reason = getattr(e, "problem", None) or (str(e).splitlines() or ["parse error"])[0]
            raise ConfigError(f"{p}: not valid YAML{where}: {reason}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
    return config_from_dict(tree, overrides)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config dataclass (for JSON, MLflow params and checkpoints)."""
    return dataclasses.asdict(cfg)
