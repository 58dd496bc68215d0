"""Packaging: `pip install .` (no extra) is enough for blip_core, and brings none of the workflow's libraries.

The environment is built without the network: the project is installed with pip (``--no-deps``) into a fresh
folder, and the distributions its metadata requires (``Requires-Dist`` without an extra), followed transitively,
are linked in from this interpreter's environment. A fresh virtual environment that sees only that folder then
imports blip_core, builds a tiny model, runs a forward and backward pass, and finds no workflow library.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ("mlflow", "boto3", "botocore", "s3fs", "kfp", "dvc", "torchx", "pycocoevalcap", "psutil")

CHECK = r"""
import importlib.util, json, sys
import torch
import blip_core
from blip_core import build_model, model_preset
from blip_core.data.loader import make_loader
from blip_core.errors import UserError
from blip_core.data.webdataset_io import read_manifest

torch.manual_seed(0)
model = build_model(model_preset("tiny"), vocab_size=100)
image = torch.randn(2, 3, 32, 32)
ids = torch.randint(5, 97, (2, 7)); ids[:, 0] = 2
mask = torch.ones_like(ids)
cross = model.cross_kv(model.encode_image(image))
logits, _ = model.decode(ids, mask, cross)
logits.sum().backward()
try:
    read_manifest("s3://bucket/dataset")
    s3 = "no error"
except UserError as e:
    s3 = str(e)
print(json.dumps({"blip_core": blip_core.__file__, "logits": list(logits.shape), "s3": s3,
                  "present": [m for m in WORKFLOW if importlib.util.find_spec(m) is not None]}))
"""


def _closure(requirements: list[str]) -> dict[str, md.Distribution]:
    """The installed distributions that ``requirements`` (Requires-Dist lines, no extra) need, transitively."""
    env = default_environment()
    todo, seen, found = [(r, "") for r in requirements], set(), {}
    while todo:
        line, extra = todo.pop()
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({**env, "extra": extra}):
            continue
        name = canonicalize_name(req.name)
        if (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            continue  # only for another platform, or optional and not installed here: nothing to link
        found[name] = dist
        for x in ("", *req.extras):
            todo += [(r, x) for r in dist.requires or []]
    return found


def _link(dist: md.Distribution, site: Path) -> None:
    """Symlink a distribution's top-level files and folders (and its metadata) into ``site``."""
    base = Path(dist.locate_file(""))
    tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
    for top in tops:
        src, dst = base / top, site / top
        if src.exists() and not dst.exists() and top != "__pycache__":
            dst.symlink_to(src)


@pytest.mark.slow  # installs the project into a fresh folder and starts a fresh interpreter
def test_core_install_runs_blip_core_without_the_workflow(tmp_path):
    src, site = tmp_path / "src", tmp_path / "site"  # built from a copy: the build leaves nothing in the tree
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("blip_core", "components", "pipelines", "benchmarks"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(site), str(src)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, "PIP_NO_CACHE_DIR": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (meta,) = site.glob("blip_capfilt-*.dist-info")
    requires = [line.split(":", 1)[1].strip() for line in (meta / "METADATA").read_text().splitlines()
                if line.startswith("Requires-Dist:")]
    core = [r for r in requires if "extra ==" not in r]
    assert {canonicalize_name(Requirement(r).name) for r in core} >= {"torch", "timm", "transformers", "tokenizers",
                                                                       "safetensors", "pillow"}
    deps = _closure(core)
    for name in WORKFLOW:
        assert canonicalize_name(name) not in deps, f"{name} is required without the workflow extra"
    for dist in deps.values():
        _link(dist, site)

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False, system_site_packages=False)
    python = env_dir / "bin" / "python"
    purelib = sysconfig.get_path("purelib", vars={"base": str(env_dir), "platbase": str(env_dir)})
    Path(purelib, "core.pth").write_text(str(site) + "\n")
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    code = f"WORKFLOW = {WORKFLOW!r}\n" + CHECK
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env={**clean_env, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["blip_core"].startswith(str(site)), result  # the installed copy, not the source tree
    assert result["logits"] == [2, 7, 100]
    assert result["present"] == [], f"workflow libraries importable without the extra: {result['present']}"
    assert "part of the workflow extra" in result["s3"]

    # the blip command: the model commands run, a workflow command says what to install in one line
    cli = subprocess.run([str(python), "-m", "components.cli", "caption", "--help"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=300, env=clean_env)
    assert cli.returncode == 0 and "--checkpoint" in cli.stdout, cli.stderr[-2000:]
    cli = subprocess.run([str(python), "-m", "components.cli", "register", "--help"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=300, env=clean_env)
    assert cli.returncode == 2, cli.stderr[-2000:]
    (line,) = cli.stderr.strip().splitlines()
    assert line.startswith("blip register: error: this command needs ") and line.endswith(
        ", part of the workflow extra: pip install 'blip-capfilt[workflow]'"), line


def test_a_missing_workflow_library_is_named_with_the_extra_to_install():
    from components.cli import workflow_dependency

    try:
        import mlflow.no_such_module  # noqa: F401
    except ModuleNotFoundError as e:
        missing = e
    assert workflow_dependency(missing) == ("this command needs mlflow, part of the workflow extra: "
                                            "pip install 'blip-capfilt[workflow]'")
    try:
        import no_such_library_at_all  # noqa: F401
    except ModuleNotFoundError as e:
        assert workflow_dependency(e) is None


@pytest.mark.parametrize(("argv", "code"), [(["--help"], 0), (["no-such-command"], 2)])
def test_the_console_script_runs_the_command_as_its_process(argv, code):
    # the `blip` script's entry point, and the one every `python -m components.<stage>` uses: atexit handlers
    # still run, after every object was frozen out of the interpreter's final garbage collection
    script = ("import atexit, gc, sys\n"
              "atexit.register(lambda: print('frozen objects:', gc.get_freeze_count(), gc.get_threshold()))\n"
              f"sys.argv = ['blip', *{argv!r}]\n"
              "from components.cli import console\n"
              "console()\n"
              "print('not reached')\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == code, run.stderr[-2000:]
    assert "not reached" not in run.stdout
    frozen, thresholds = run.stdout.rsplit("frozen objects:", 1)[1].split(maxsplit=1)
    assert int(frozen) > 1000  # everything imported so far, not a handful
    from components.cli import PROCESS_GC_THRESHOLDS

    assert ast.literal_eval(thresholds) == PROCESS_GC_THRESHOLDS != (700, 10, 10)  # the collector set for a large heap


def test_every_entry_point_runs_its_command_as_the_process():
    root = Path(__file__).resolve().parents[1]
    scripts = md.distribution("blip-capfilt").entry_points.select(group="console_scripts")
    assert {ep.name: ep.value for ep in scripts}["blip"] == "components.cli:console"
    for stage in ("pretrain", "finetune", "capfilt", "evaluate", "register"):
        assert 'if __name__ == "__main__":\n    run_as_process(main)' in (root / "components" / f"{stage}.py").read_text()
