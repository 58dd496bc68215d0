"""The MLflow model of a BLIP checkpoint: the pyfunc that captions images and scores image-text pairs (a VQA
checkpoint: answers questions about images), and how it is packaged (signature, requirements, code).

This file is logged as MLflow "models from code" by :func:`log_pyfunc` (called by
:meth:`components.tracking.StageRun.log_blip_model`): MLflow copies it next to the checkpoint artifact, as
``mlflow_model.py``, and runs it when the model is loaded, so nothing is pickled. Run that way it imports only
``blip_core`` (shipped with the model as code), mlflow, torch, PIL, numpy and pandas, and registers
:class:`BlipPyfunc` with ``mlflow.models.set_model``; imported as ``components.tracking.mlflow_model`` it only
defines it.

Input: a pandas DataFrame (or a list of dicts / a dict of lists) with

- ``image``: base64-encoded PNG/JPEG bytes (a ``data:image/...;base64,`` prefix is accepted) or raw bytes.
  A file path is not read: a request must never be able to open, or probe for, files on the server. An
  image with more pixels than ``max_pixels`` (model config; default 40 megapixels) is refused from its
  header, before it is decoded;
- ``text`` (optional): a caption to score against the row's image.

Output: a DataFrame with one row per input row. Rows without text get ``caption`` (beam search, prompt
"a picture of ", the prompt removed); rows with text get ``itm_prob`` (ITM match probability) and
``itc_cosine`` (cosine of the ITC features). A frame mixing both kinds of row carries all three columns, with
missing values where a column does not apply.

Inference parameters (``params=`` in ``predict``, or ``"params"`` in a serving request) override the decoding
defaults: ``decoding`` (``beam``), ``num_beams`` (3), ``max_length`` (20), ``min_length`` (5), ``prompt``
("a picture of "), ``batch_size`` (16).

A VQA checkpoint (``blip finetune --task vqa``) takes ``image`` and ``question`` in every row and returns
``answer``, generated as the official VQA model does (``decoding`` beam or greedy, ``num_beams`` 3,
``max_length`` 10, ``min_length`` 1, ``batch_size`` 16).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import shutil
import sys
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from blip_core.constants import DEFAULT_PROMPT

MODEL_CODE = Path(__file__)  # this file, logged as the model's code
CHECKPOINT_ARTIFACT = "checkpoint"
DEFAULT_PARAMS: dict[str, Any] = {
    "decoding": "beam",
    "num_beams": 3,
    "max_length": 20,
    "min_length": 5,
    "prompt": DEFAULT_PROMPT,
    "batch_size": 16,
}
VQA_PARAMS: dict[str, Any] = {"decoding": "beam", "num_beams": 3, "max_length": 10, "min_length": 1, "batch_size": 16}


def _missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value == ""


def decode_image(value: Any, max_pixels: int | None = None):
    """A PIL RGB image from base64 text or raw bytes (never a file path), at most ``max_pixels`` pixels."""
    from blip_core.images import MAX_PIXELS, ImageTooLarge, open_rgb

    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("data:") and "," in text:
            text = text.split(",", 1)[1]
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError("image is not base64-encoded image bytes (file paths are not accepted)") from e
    else:
        raise ValueError(f"image must be base64 text or bytes, not {type(value).__name__}")
    try:
        return open_rgb(data, max_pixels or MAX_PIXELS)
    except ImageTooLarge:
        raise
    except (OSError, ValueError, SyntaxError) as e:  # UnidentifiedImageError is an OSError
        raise ValueError("image bytes are not a readable PNG/JPEG image") from e


def _as_frame(model_input: Any) -> pd.DataFrame:
    if isinstance(model_input, pd.DataFrame):
        df = model_input
    elif isinstance(model_input, dict):
        df = pd.DataFrame(model_input) if any(isinstance(v, list) for v in model_input.values()) \
            else pd.DataFrame([model_input])
    elif isinstance(model_input, list):
        df = pd.DataFrame(model_input)
    else:
        raise ValueError(f"input must be a DataFrame with an 'image' column, not {type(model_input).__name__}")
    if "image" not in df.columns:
        raise ValueError("input needs an 'image' column (base64-encoded PNG/JPEG bytes)")
    return df.reset_index(drop=True)


class BlipPyfunc(PythonModel):
    """Caption images (no ``text``) or score image-text pairs (with ``text``) with a BLIP checkpoint."""

    def load_context(self, context) -> None:
        import torch

        from blip_core import load_model_dir

        loaded = load_model_dir(context.artifacts[CHECKPOINT_ARTIFACT])
        config = dict(getattr(context, "model_config", None) or {})
        device = config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        self.model = loaded.model.to(self.device).eval()
        self.tokenizer = loaded.tokenizer
        self.image_size = int(self.model.cfg.vision.image_size)
        from blip_core.models.vqa import is_vqa

        self.vqa = is_vqa(self.model)
        base = VQA_PARAMS if self.vqa else DEFAULT_PARAMS
        self.defaults = {**base, **{k: v for k, v in config.items() if k in base}}
        self.max_pixels = int(config.get("max_pixels") or 0) or None
        self._transform = self._make_transform()

    def _make_transform(self):
        from blip_core.data.transforms import EvalTransform

        tf = EvalTransform(self.image_size)
        return lambda img: tf(img)[0]

    def _images(self, values: list[Any], rows: list[int]):
        import torch

        tensors = []
        for row, value in zip(rows, values):
            try:
                tensors.append(self._transform(decode_image(value, self.max_pixels)))
            except ValueError as e:
                raise ValueError(f"row {row}: {e}") from e
        return torch.stack(tensors).to(self.device, non_blocking=True)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        import torch

        from blip_core.generation import generate_captions, itm_scores

        opts = {**self.defaults, **{k: v for k, v in (params or {}).items() if v is not None}}
        batch_size = max(1, int(opts["batch_size"]))
        df = _as_frame(model_input)
        if self.vqa:
            return self._answer(df, opts, batch_size)
        images = df["image"].tolist()
        texts = df["text"].tolist() if "text" in df.columns else [None] * len(df)
        caption_rows = [i for i, t in enumerate(texts) if _missing(t)]
        score_rows = [i for i, t in enumerate(texts) if not _missing(t)]

        captions: dict[int, str] = {}
        scores: dict[int, tuple[float, float]] = {}
        with torch.inference_mode():
            for start in range(0, len(caption_rows), batch_size):
                rows = caption_rows[start:start + batch_size]
                batch = self._images([images[i] for i in rows], rows)
                generated = generate_captions(self.model, self.tokenizer, batch, decoding=opts["decoding"],
                                              num_beams=int(opts["num_beams"]), max_length=int(opts["max_length"]),
                                              min_length=int(opts["min_length"]), prompt=str(opts["prompt"]))
                captions.update(zip(rows, generated))
            by_image: dict[Any, list[int]] = {}  # rows sharing an image are scored in one call
            for i in score_rows:
                value = images[i]
                by_image.setdefault(bytes(value) if isinstance(value, (bytearray, memoryview)) else value,
                                    []).append(i)
            for rows in by_image.values():
                image = self._images([images[rows[0]]], rows[:1])
                for start in range(0, len(rows), batch_size):
                    chunk = rows[start:start + batch_size]
                    itm, itc = itm_scores(self.model, self.tokenizer, image, [str(texts[i]) for i in chunk])
                    scores.update(zip(chunk, zip(itm.reshape(-1).float().cpu().tolist(),
                                                 itc.reshape(-1).float().cpu().tolist())))

        out: dict[str, list] = {}
        if caption_rows:
            out["caption"] = [captions.get(i) for i in range(len(df))]
        if score_rows:
            out["itm_prob"] = [scores[i][0] if i in scores else None for i in range(len(df))]
            out["itc_cosine"] = [scores[i][1] if i in scores else None for i in range(len(df))]
        if not out:
            out["caption"] = []
        return pd.DataFrame(out)

    def _answer(self, df: pd.DataFrame, opts: dict[str, Any], batch_size: int) -> pd.DataFrame:
        """A VQA model: one generated answer per row (``image``, ``question``)."""
        import torch

        from blip_core.vqa import generate_answers

        if "question" not in df.columns:
            raise ValueError("a VQA model needs a 'question' column")
        questions = df["question"].tolist()
        for i, q in enumerate(questions):
            if _missing(q) or not str(q).strip():
                raise ValueError(f"row {i}: empty question")
        images = df["image"].tolist()
        answers: list[str] = []
        with torch.inference_mode():
            for start in range(0, len(df), batch_size):
                rows = list(range(start, min(start + batch_size, len(df))))
                batch = self._images([images[i] for i in rows], rows)
                answers += generate_answers(self.model, self.tokenizer, batch, [str(questions[i]) for i in rows],
                                            decoding=str(opts["decoding"]), num_beams=int(opts["num_beams"]),
                                            max_length=int(opts["max_length"]), min_length=int(opts["min_length"]))
        return pd.DataFrame({"answer": answers})


# --------------------------------------------------------------------------------------------------
# Packaging
# --------------------------------------------------------------------------------------------------


def _copy_package(package: str, dest: Path) -> str:
    module = sys.modules.get(package) or __import__(package)
    src = Path(module.__file__).parent
    target = dest / package
    shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return str(target)


def model_requirements() -> list[str]:
    """Pinned pip requirements of the pyfunc (given explicitly: MLflow's inference would load the model)."""
    from importlib import metadata

    out = []
    for dist in ("mlflow", "torch", "torchvision", "timm", "transformers", "tokenizers", "safetensors",
                 "pillow", "numpy", "pandas", "pyyaml"):
        try:
            out.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return out


def _is_vqa_checkpoint(ckpt: Path) -> bool:
    try:
        return json.loads((ckpt / "config.json").read_text()).get("architecture") == "blip_vqa"
    except (OSError, ValueError, AttributeError):
        return False


def model_signature(vqa: bool = False):
    """Input ``image`` (string: base64-encoded image bytes) and optional ``text``; decoding options as params.

    ``vqa``: the signature of a VQA model: ``image`` and ``question``, answer decoding options."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    if vqa:
        return ModelSignature(
            inputs=Schema([ColSpec("string", "image"), ColSpec("string", "question")]),
            params=ParamSchema([
                ParamSpec("decoding", "string", "beam"),
                ParamSpec("num_beams", "long", 3),
                ParamSpec("max_length", "long", 10),
                ParamSpec("min_length", "long", 1),
                ParamSpec("batch_size", "long", 16),
            ]),
        )

    return ModelSignature(
        inputs=Schema([ColSpec("string", "image"), ColSpec("string", "text", required=False)]),
        params=ParamSchema([
            ParamSpec("decoding", "string", "beam"),
            ParamSpec("num_beams", "long", 3),
            ParamSpec("max_length", "long", 20),
            ParamSpec("min_length", "long", 5),
            ParamSpec("prompt", "string", DEFAULT_PROMPT),
            ParamSpec("batch_size", "long", 16),
        ]),
    )


def log_pyfunc(checkpoint: Path, name: str = "model", registered_name: str | None = None, *,
               model_config: Mapping[str, Any] | None = None, include_code: bool = True,
               tags: Mapping[str, Any] | None = None):
    """Log the local checkpoint directory ``checkpoint`` as this pyfunc in the active run; return the ModelInfo.

    With ``include_code`` the ``blip_core`` package travels with the model; with ``registered_name`` a new
    version of that registered model is created.
    """
    with tempfile.TemporaryDirectory(prefix="blip-code-") as tmp:
        code_paths = [_copy_package("blip_core", Path(tmp))] if include_code else None
        with warnings.catch_warnings():  # the explicit signature stands in for an input example
            warnings.filterwarnings("ignore", message=r".*input example", category=UserWarning)
            return mlflow.pyfunc.log_model(
                name=name,
                python_model=str(MODEL_CODE),
                artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)},
                code_paths=code_paths,
                pip_requirements=model_requirements(),
                signature=model_signature(vqa=_is_vqa_checkpoint(checkpoint)),
                model_config=dict(model_config) if model_config else None,
                registered_model_name=registered_name,
                tags=dict(tags) if tags else None,
            )


if __name__ != "components.tracking.mlflow_model":  # run by MLflow as the model's code (logging, loading)
    mlflow.models.set_model(BlipPyfunc())
