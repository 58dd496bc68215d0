"""``blip pipeline compile | submit | run-local``: the Kubeflow pipeline from the command line.

- ``compile [--output PATH]`` writes the pipeline YAML (default ``pipelines/blip_capfilt.yaml``, the committed
  copy); ``--image``, ``--launcher``, ``--gpu-type``, ``--gpus``, ``--gpu-product`` change compile-time settings.
- ``submit --host URL [--experiment NAME] [--param k=v ...] [--run-name NAME]`` compiles with the same options
  (or takes ``--package``) and starts a run through ``kfp.Client``.
- ``run-local [--param k=v ...] [--pipeline-root DIR]`` runs the whole pipeline on this machine with
  ``kfp.local.SubprocessRunner(use_venv=False)`` (every step a subprocess of this interpreter) on a tiny config
  and toy-web data, tracking to ``sqlite:///<pipeline-root>/mlflow.db`` unless ``MLFLOW_TRACKING_URI`` is set.

``--param`` values are parsed by the parameter's type: numbers, JSON for lists and dicts
(``--param config_overrides='["pretrain.epochs=2"]'``), ``--param torchx.nodes=2`` sets one key of a dict
parameter, and ``--set KEY=VALUE`` appends to ``config_overrides``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from blip_core.errors import UserError
from components.cli import environment, one_line_errors

COMMITTED_YAML = Path(__file__).with_name("blip_capfilt.yaml")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_DICT_DEFAULT = re.compile(r"^(#\s+\w+: dict \[Default: )(\{.*\})\]$", re.M)

# run-local: a tiny model on small toy-web splits (about a minute of training on 2 CPU cores)
LOCAL_OVERRIDES = [
    "model.preset=tiny", "ingest.resolution=32", "data.shuffle_buffer=50",
    "pretrain.epochs=1", "pretrain.batch_size=8", "pretrain.warmup_steps=2",
    "finetune_captioner.epochs=1", "finetune_captioner.batch_size=8",
    "finetune_filter.epochs=1", "finetune_filter.batch_size=8",
    "finetune_vqa.epochs=1", "finetune_vqa.batch_size=8", "evaluate.vqa_k_test=8",
    "capfilt.batch_size=16", "evaluate.batch_size=16", "evaluate.num_beams=2",
]
LOCAL_SOURCES = {
    "web_source": "toyweb://?split=web&n=64&seed=1&size=32",
    "human_source": "toyweb://?split=human&n=24&seed=1&size=32",
    "test_source": "toyweb://?split=test&n=12&seed=1&size=32",
    "calibration_source": "toyweb://?split=web&n=24&noise=0.5&seed=2&size=32",
    "vqa_train_source": "toyweb://?split=vqa_train&n=16&seed=1&size=32",
    "vqa_test_source": "toyweb://?split=vqa_test&n=6&seed=1&size=32",
}


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _pipeline(args: argparse.Namespace | None = None):
    from pipelines.pipeline import make_pipeline

    if args is None:
        return make_pipeline()
    return make_pipeline(image=args.image, launcher=args.launcher, gpu_type=args.gpu_type, gpus=args.gpus,
                         gpu_product=args.gpu_product)


def compile_pipeline(path: str | Path, pipeline=None) -> Path:
    """Compile ``pipeline`` (default: the committed settings) to ``path``; returns the path."""
    from kfp import compiler

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline or _pipeline(), str(path))
    # The header comment lists dict defaults in protobuf map order, which changes from run to run: sort them
    # so that compiling the same pipeline twice gives the same file.
    text = _DICT_DEFAULT.sub(lambda m: f"{m.group(1)}{dict(sorted(ast.literal_eval(m.group(2)).items()))}]",
                             path.read_text())
    path.write_text(text)
    return path


def _convert(name: str, kind: str, text: str) -> Any:
    try:
        if kind == "String":
            return text
        if kind == "Integer":
            return int(text)
        if kind == "Float":
            return float(text)
        if kind == "Boolean":
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        value = json.loads(text)
    except (ValueError, json.JSONDecodeError):
        raise UserError(f"--param {name}: cannot read {text!r} as {kind}"
                        + (" (give JSON)" if kind in ("List", "Dict") else "")) from None
    if kind == "List" and not isinstance(value, list) or kind == "Dict" and not isinstance(value, dict):
        raise UserError(f"--param {name}: expected a JSON {'list' if kind == 'List' else 'object'}, got {text!r}")
    return value


def _scalar(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_params(pairs: Sequence[str], sets: Sequence[str] = (), pipeline=None,
                 base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Pipeline arguments from ``k=v`` strings, typed by the pipeline's parameters (see the module doc)."""
    inputs = (pipeline or _pipeline()).component_spec.inputs
    out: dict[str, Any] = dict(base or {})
    for pair in pairs:
        key, eq, text = pair.partition("=")
        if not eq or not key:
            raise UserError(f"--param expects KEY=VALUE, got {pair!r}")
        name, dot, sub = key.partition(".")
        if name not in inputs:
            raise UserError(f"unknown pipeline parameter {name!r}; parameters: {', '.join(inputs)}")
        kind = inputs[name].type
        if dot:
            if kind != "Dict":
                raise UserError(f"--param {key}: {name} is a {kind}, not a dict")
            current = dict(out.get(name, inputs[name].default) or {})
            current[sub] = _scalar(text)
            out[name] = current
        else:
            out[name] = _convert(name, kind, text)
    if sets:
        out["config_overrides"] = [*out.get("config_overrides", []), *sets]
    return out


def _add_compile_options(p: argparse.ArgumentParser) -> None:
    from pipelines import settings

    p.add_argument("--image", default=None, help=f"image of every step (default: $BLIP_IMAGE or {settings.DEFAULT_IMAGE})")
    p.add_argument("--launcher", choices=settings.LAUNCHERS, default=None,
                   help="default launcher of the training steps; torchx also drops their GPU requests "
                        "(default: $BLIP_LAUNCHER or inline)")
    p.add_argument("--gpu-type", default=None, help="accelerator resource (default: $BLIP_GPU_TYPE or nvidia.com/gpu)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs of each GPU step (default 1)")
    p.add_argument("--gpu-product", default=None,
                   help="node selector nvidia.com/gpu.product, e.g. NVIDIA-A100-SXM4-80GB (default: none)")


def _add_param_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="pipeline parameter (repeatable); KEY.SUB=VALUE for a dict parameter")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="config override appended to config_overrides, e.g. --set pretrain.epochs=2")


# --------------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------------


def cmd_compile(args: argparse.Namespace) -> int:
    path = compile_pipeline(args.output, _pipeline(args))
    print(f"compiled pipeline to {path}")
    return 0


def _first_reason(e: BaseException) -> str:
    reason = getattr(e, "reason", None) or e
    text = _ANSI.sub("", str(reason)).strip()
    m = re.search(r"(Connection refused|Name or service not known|timed out|No route to host|"
                  r"Failed to establish a new connection[^']*|certificate verify failed|"
                  r"HTTP(?: status)? ?\d{3}[^\n]*|Unauthorized|Forbidden)", text)
    if m:
        return m.group(1)
    return text.splitlines()[0][:200] if text else type(e).__name__


def cmd_submit(args: argparse.Namespace) -> int:
    pipeline = _pipeline(args)
    arguments = parse_params(args.param, args.sets, pipeline)
    import kfp

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            client = kfp.Client(host=args.host, namespace=args.namespace, existing_token=args.token or None)
    except Exception as e:  # noqa: BLE001 - connection, TLS and auth errors: one line
        raise UserError(f"cannot reach the Kubeflow Pipelines API at {args.host}: {_first_reason(e)}") from None
    with tempfile.TemporaryDirectory(prefix="blip-kfp-") as d:
        package = args.package or str(compile_pipeline(Path(d) / "blip_capfilt.yaml", pipeline))
        try:
            run = client.create_run_from_pipeline_package(
                package, arguments=arguments, run_name=args.run_name or time.strftime("blip-capfilt-%Y%m%d-%H%M%S"),
                experiment_name=args.experiment, namespace=args.namespace, service_account=args.service_account,
                enable_caching=False if args.no_cache else None)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"Kubeflow Pipelines at {args.host} refused the run: {_first_reason(e)}") from None
    print(f"submitted run {run.run_id} (experiment {args.experiment!r}) to {args.host}")
    if args.wait:
        detail = client.wait_for_run_completion(run.run_id, timeout=args.wait)
        state = getattr(detail, "state", None) or getattr(getattr(detail, "run", None), "status", "?")
        print(f"run {run.run_id}: {state}")
        if str(state).upper() not in ("SUCCEEDED", "SUCCESS"):
            return 1
    return 0


def _local_defaults(root: Path) -> dict[str, Any]:
    tracking = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"
    return {**LOCAL_SOURCES, "params_file": "", "config_overrides": list(LOCAL_OVERRIDES), "output_root": "",
            "s3_endpoint": os.environ.get("AWS_ENDPOINT_URL_S3", ""), "mlflow_tracking_uri": tracking,
            "launcher": "inline", "torchx": {"scheduler": "local_cwd", "nodes": 1, "procs_per_node": 2}}


def _failure(e: BaseException, errors_dir: Path) -> UserError:
    records = []
    for f in sorted(errors_dir.glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            records.append(json.loads(f.read_text()))
    text = _ANSI.sub("", str(e)).strip()
    task = re.search(r"Inner task failed: '([^']+)'", text) or re.search(r"Task '([^']+)'", text)
    if records:
        first = records[0]
        return UserError(f"stage '{first['stage']}' failed: {first['error']}"
                         + (f" (KFP task '{task.group(1)}')" if task else ""))
    if task:
        return UserError(f"stage '{task.group(1)}' failed: {text.splitlines()[0]}")
    return UserError(f"the local pipeline run failed: {text.splitlines()[0] if text else type(e).__name__}")


def run_local(params: dict[str, Any] | None = None, pipeline_root: str | Path = "local_outputs") -> Path:
    """Run the pipeline with kfp.local (SubprocessRunner, use_venv=False); returns the run's output directory.

    ``params`` override the local defaults (tiny config, toy-web sources, artifact outputs, sqlite tracking).
    Steps are not retried here. A failing stage raises :class:`UserError` naming it.
    """
    from kfp import local

    from pipelines.pipeline import make_pipeline
    from pipelines.steps import ERRORS_ENV

    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    pipeline = make_pipeline(launcher="inline", retries=False)
    arguments = {**_local_defaults(root), **(params or {})}
    before = set(root.glob(f"{pipeline.name}-*"))
    local.init(local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    with tempfile.TemporaryDirectory(prefix="blip-pipeline-errors-") as errors, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        # the steps inherit this environment; one intra-op thread per step keeps tiny models fast on a
        # shared machine (a multi-threaded tiny matmul mostly waits for the other thread)
        try:
            with environment(**{ERRORS_ENV: errors, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}):
                pipeline(**arguments)
        except Exception as e:  # noqa: BLE001 - kfp.local raises RuntimeError with the failed task
            raise _failure(e, Path(errors)) from None
    runs = sorted(set(root.glob(f"{pipeline.name}-*")) - before)
    return runs[-1] if runs else root


def cmd_run_local(args: argparse.Namespace) -> int:
    params = parse_params(args.param, args.sets, base={"config_overrides": list(LOCAL_OVERRIDES)})
    t0 = time.monotonic()
    out = run_local(params, args.pipeline_root)
    print(f"pipeline finished in {time.monotonic() - t0:.0f} s; artifacts under {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="blip pipeline", description="Compile, submit or locally run the Kubeflow pipeline.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="compile the pipeline to YAML")
    c.add_argument("--output", default=str(COMMITTED_YAML), help=f"default: {COMMITTED_YAML}")
    _add_compile_options(c)
    s = sub.add_parser("submit", help="start a run on a Kubeflow Pipelines server")
    s.add_argument("--host", required=True, help="KFP API or UI URL, e.g. http://localhost:8080")
    s.add_argument("--experiment", default="blip-capfilt")
    s.add_argument("--run-name", default=None)
    s.add_argument("--namespace", default=None, help="Kubeflow profile namespace (multi-user Kubeflow)")
    s.add_argument("--service-account", default=None, help="run the steps as this service account")
    s.add_argument("--token", default=None, help="bearer token (default: kfp's own credential lookup)")
    s.add_argument("--package", default=None, help="submit this compiled YAML instead of compiling")
    s.add_argument("--no-cache", action="store_true", help="disable caching for this run")
    s.add_argument("--wait", type=int, default=0, metavar="SECONDS", help="wait for the run to finish")
    _add_param_options(s)
    _add_compile_options(s)
    r = sub.add_parser("run-local", help="run the whole pipeline here with kfp.local on a tiny config")
    r.add_argument("--pipeline-root", default="local_outputs", help="where artifacts go (default: ./local_outputs)")
    _add_param_options(r)
    for parser in (p, c, s, r):
        one_line_errors(parser)
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    return {"compile": cmd_compile, "submit": cmd_submit, "run-local": cmd_run_local}[args.command](args)


if __name__ == "__main__":
    from components.cli import main as blip
    from components.cli import run_as_process

    run_as_process(lambda: blip(["pipeline", *sys.argv[1:]]))
