"""The ``blip`` command: one sub-command per stage or tool, each implemented by a module's ``main(argv)``.

Sub-commands are imported lazily so ``blip --help`` stays fast and a stage's heavy imports (MLflow, KFP,
TorchX) load only when that stage runs.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import NoReturn

from blip_core.errors import UserError
from blip_core.redact import install_log_redaction, redact

# sub-command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "ingest": ("components.ingest", "clean, check and shard raw image-text pairs (local or s3://)"),
    "pretrain": ("components.pretrain", "pre-train BLIP with ITC + ITM + LM"),
    "finetune": ("components.finetune", "fine-tune the captioner (LM) or the filter (ITC + ITM)"),
    "capfilt": ("components.capfilt", "caption web images and filter web + synthetic captions"),
    "evaluate": ("components.evaluate", "retrieval and captioning metrics on the clean test split"),
    "register": ("components.register", "register the final model in MLflow, promote if better"),
    "convert": ("components.convert", "convert checkpoints: Hugging Face / official BLIP <-> blip_core"),
    "caption": ("components.infer", "caption images with a checkpoint"),
    "itm": ("components.infer", "score image-text pairs (ITM probability and ITC cosine)"),
    "vqa": ("components.infer", "answer a question about images with a VQA checkpoint"),
    "pipeline": ("pipelines.cli", "compile, submit or locally run the Kubeflow pipeline"),
}


def one_line_errors(parser) -> None:
    """Make ``parser`` report a usage mistake as one line and exit 2, like every other user error."""
    def error(message: str):
        parser.exit(2, f"{parser.prog}: error: {message} (see '{parser.prog} --help')\n")

    parser.error = error


def add_config_args(parser, *, tracking: bool = True) -> None:
    """The options every stage shares: ``--config``, repeatable ``--set KEY=VALUE`` and ``--parent-run-id``.

    A stage's ``main`` also runs without the dispatcher (``python -m components.pretrain`` under torchrun), so
    this is where its parser gets one-line errors and its process gets redacted log records.
    """
    one_line_errors(parser)
    install_log_redaction()
    parser.add_argument("--config", default=None, help="params.yaml (default: built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set pretrain.lr=1e-4 (repeatable)")
    if tracking:
        parser.add_argument("--parent-run-id", default=None,
                            help="MLflow parent run (default: $BLIP_PARENT_RUN_ID)")


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore each (removed if it was unset)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_distributed_main(parser, argv: list[str] | None, run, report) -> int:
    """The rest of the ``main`` of a stage that may run under torchrun: parse ``argv``, load the config, call
    ``run(args, cfg)``, let rank 0 ``report(args, result)``, then leave the process group; returns 0."""
    from blip_core.config import load_config
    from blip_core.train import distributed as D

    args = parser.parse_args(argv)
    res = run(args, load_config(args.config, args.overrides))
    if D.rank() == 0:
        report(args, res)
    D.destroy()
    return 0


def _usage() -> str:
    lines = ["usage: blip <command> [options]", "", "commands:"]
    for name, (_, text) in COMMANDS.items():
        lines.append(f"  {name:<10} {text}")
    lines += ["", "Run 'blip <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    install_log_redaction()  # no credentials in any log line of this process
    if name not in COMMANDS:
        print(f"blip: error: unknown command {name!r} (run 'blip --help' for the list)", file=sys.stderr)
        return 2
    module_name, _ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            print(f"blip: command {name!r} is not available in this installation", file=sys.stderr)
            return 2
        if (missing := workflow_dependency(e)) is None:
            raise
        print(f"blip {name}: error: {missing}", file=sys.stderr)
        return 2
    entry = getattr(module, f"main_{name}", None) or module.main
    try:
        return int(entry(rest) or 0)
    except ModuleNotFoundError as e:
        if (missing := workflow_dependency(e)) is None:
            raise
        print(f"blip {name}: error: {missing}", file=sys.stderr)
        return 2
    except UserError as e:
        print(f"blip {name}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        # a path the user gave is of the wrong kind or not writable (e.g. --output names an existing file)
        where = f"{e.filename}: " if e.filename else ""
        print(f"blip {name}: error: {redact(where + (e.strerror or str(e)))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"blip {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        error = storage_error(e)
        if error is None:
            raise
        print(f"blip {name}: error: {_one_line(error)}", file=sys.stderr)
        return 2


# Top-level modules of the workflow extra (pyproject.toml), which a core-only install (`pip install .`) lacks.
WORKFLOW_MODULES = frozenset({"boto3", "botocore", "fsspec", "s3fs", "mlflow", "dvc", "dvc_s3", "pycocoevalcap",
                              "kfp", "torchx", "psutil"})


def workflow_dependency(e: ModuleNotFoundError) -> str | None:
    """The one-line message for a missing module of the workflow extra; None for any other missing module."""
    top = (e.name or "").split(".")[0]
    if top not in WORKFLOW_MODULES:
        return None
    return f"this command needs {top}, part of the workflow extra: pip install 'blip-capfilt[workflow]'"


def _one_line(e: BaseException) -> str:
    """The message of a user error as one line with credentials redacted (a wrapped library message may span
    several lines: its first line is its summary)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return redact(lines[0] if lines else type(e).__name__)


def storage_error(e: BaseException) -> UserError | None:
    """The one-line error for an S3 failure (no credentials, unreachable endpoint, denied) that escaped
    :mod:`components.s3` unmapped; None when ``e`` is not one. Imports boto3 only when ``e`` comes from botocore."""
    if not type(e).__module__.startswith("botocore"):
        return None
    from components.storage import s3_user_error

    return s3_user_error(e)


def exit_process(code: int | None) -> NoReturn:
    """End a command's process with ``code``, skipping the interpreter's final garbage collection.

    That collection walks every object torch, timm and MLflow created, about 2 s per stage process on the
    demo's machine, and finds nothing to do: a command has closed its files and ended its runs by the time it
    returns. ``gc.freeze()`` moves every object out of the collector's reach; ``atexit`` handlers and the
    interpreter's shutdown still run. Only for a process about to end: in a long-lived one (a test session)
    frozen objects would never be collected.
    """
    gc.freeze()
    sys.exit(code)


# The cyclic garbage collector's thresholds in a command's own process (Python's default: 700, 10, 10). A stage
# imports torch, timm and MLflow, a few hundred thousand long-lived objects, and at the default the collector
# walks them again and again while they load and while the stage sets up: about 2.5 s of a stage process on
# the demo's machine (docs/benchmarks.md). A training step makes few objects that outlive it, so collections
# stay frequent enough to bound what cycles hold.
PROCESS_GC_THRESHOLDS = (50_000, 10, 10)


def run_as_process(entry: Callable[[], int | None]) -> NoReturn:
    """Run a command's ``entry`` as the whole process: the collector set for a large, long-lived heap
    (:data:`PROCESS_GC_THRESHOLDS`), then :func:`exit_process` with its code. Not for a long-lived process
    that calls commands (a test session): there :func:`main` is called directly."""
    gc.set_threshold(*PROCESS_GC_THRESHOLDS)
    exit_process(entry())


def console() -> NoReturn:
    """The ``blip`` console script: :func:`main` on ``sys.argv`` as the whole process."""
    run_as_process(main)


if __name__ == "__main__":
    console()
