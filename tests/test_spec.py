"""Stage specs (components/spec.py): one declaration per stage gives its parser, its run() arguments, the TorchX
job's argument list and path options, the pipeline steps' calls and its dvc.yaml params."""

from __future__ import annotations

import inspect
import json
import shlex
import sys
import types
from pathlib import Path

import pytest
import yaml

from blip_core.config import load_config
from components import launch, spec
from components.spec import Option, StageSpec

ROOT = Path(__file__).resolve().parents[1]
STAGES = tuple(spec.MODULES)


@pytest.mark.parametrize("name", STAGES)
def test_spec_matches_its_module_and_run(name):
    s = spec.get(name)
    module = sys.modules[s.module]
    assert s.name == name and s.module == spec.MODULES[name]
    if name == "ingest":  # its main dispatches parts and workers itself
        return
    params = inspect.signature(module.run).parameters
    assert set(s.run_kwargs({})) <= set(params), f"{name}: spec options without a run() parameter"
    required = {p for p, v in params.items() if v.default is inspect.Parameter.empty and p != "cfg"}
    assert required <= set(s.run_kwargs({})), f"{name}: run() parameters no option fills"


def _sample_values(s: StageSpec) -> dict:
    values = {}
    for o in s.all_options:
        if o.action == "store_true":
            values[o.dest] = True
        elif o.action == "append":
            values[o.dest] = ["a=x/a", "b=s3://bucket/b"]
        elif o.nargs:
            values[o.dest] = ["rel/one", "s3://bucket/two"]
        elif o.choices is not None:
            choices = o.choices() if callable(o.choices) else o.choices
            values[o.dest] = list(choices)[0]
        elif o.type is not None:
            values[o.dest] = o.type("3")
        else:
            values[o.dest] = f"rel/{o.dest}"
    return values


@pytest.mark.parametrize("name", STAGES)
def test_argv_parses_back_to_the_same_run_arguments(name):
    """What a pipeline step passes inline (run_kwargs of values) is what the stage's own parser makes of the
    argument list a TorchX job gets (argv of the same values)."""
    s = spec.get(name)
    values = _sample_values(s)
    argv = s.argv(values, config="params.yaml", overrides=["pretrain.lr=1e-4"])
    parsed = s.parser().parse_args(argv)
    assert parsed.config == "params.yaml" and parsed.overrides == ["pretrain.lr=1e-4"]
    assert s.run_kwargs(parsed) == s.run_kwargs(values)
    with pytest.raises(KeyError, match="unknown option"):
        s.argv({**values, "nope": 1})


def test_launch_makes_every_input_and_output_of_the_stage_absolute(tmp_path, monkeypatch):
    """The TorchX path options are the spec's inputs and outputs: capfilt's --calibration and finetune's --val
    too (relative paths of a local_cwd job are made absolute)."""
    monkeypatch.chdir(tmp_path)
    args = launch.absolute_paths(["--web", "w", "--calibration", "c1", "c2", "--output", "o", "--set", "x=y"],
                                 stage="capfilt")
    assert args == ["--web", str(tmp_path / "w"), "--calibration", str(tmp_path / "c1"), str(tmp_path / "c2"),
                    "--output", str(tmp_path / "o"), "--set", "x=y"]
    assert launch.absolute_paths(["--val", "v"], stage="finetune") == ["--val", str(tmp_path / "v")]
    assert launch.path_options("pretrain") == {"--data", "--init", "--vit-init", "--bert-init", "--vocab-data",
                                               "--output", "--config"}
    assert set(launch.STAGES) == {"pretrain", "finetune", "capfilt"}
    assert all(launch.STAGES[n] == spec.get(n).module for n in launch.STAGES)


# --------------------------------------------------------------------------------------------------
# dvc.yaml
# --------------------------------------------------------------------------------------------------


def _dvc_stages() -> dict[str, tuple[str, list[str]]]:
    """``{stage@key: (cmd, params)}`` of dvc.yaml with foreach expanded (over params.yaml for ``${sources}``)."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    out = {}
    for name, stage in dvc["stages"].items():
        if "foreach" not in stage:
            out[name] = (stage["cmd"], list(stage.get("params", [])))
            continue
        items = stage["foreach"]
        if isinstance(items, str):  # ${sources}
            items = params[items.strip("${}")]
        for key, item in items.items():
            def sub(text, key=key, item=item):
                return text.replace("${key}", key).replace("${item}", item)

            do = stage["do"]
            out[f"{name}@{key}"] = (sub(do["cmd"]), [sub(p) for p in do.get("params", [])])
    return out


def _has_key(tree: dict, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


@pytest.mark.parametrize("stage", sorted(_dvc_stages()))
def test_dvc_params_are_the_stage_specs_config_keys(stage):
    """Each dvc.yaml stage lists exactly the config keys its spec says the stage reads, for the options in its
    command (a finetune task's own section), and each is in params.yaml and in the tests' tiny params."""
    cmd, params = _dvc_stages()[stage]
    argv = shlex.split(cmd)
    assert argv[0] == "blip" and argv[1] in spec.MODULES, cmd
    s = spec.get(argv[1])
    values = s.parser().parse_args(argv[2:])
    assert sorted(params) == sorted(s.sections(values)), f"dvc.yaml {stage}: params drift from the spec"
    for path in (ROOT / "params.yaml", ROOT / "tests" / "assets" / "params_tiny.yaml"):
        tree = yaml.safe_load(path.read_text())
        missing = [k for k in params if not _has_key(tree, k)]
        assert not missing, f"{path.name} lacks {missing}: dvc refuses params missing from the params file"
    for key in params:  # and each is a key of the typed config
        section, _, rest = key.partition(".")
        cfg = load_config(None, [])
        assert hasattr(cfg, section) and (not rest or hasattr(getattr(cfg, section), rest)), key


def test_finetune_with_validation_also_reads_the_evaluate_section():
    s = spec.get("finetune")
    assert s.sections({"task": "filter"}) == ["model", "data", "finetune_filter"]
    assert s.sections({"task": "filter", "val": ["v"]}) == ["model", "data", "finetune_filter", "evaluate"]


# --------------------------------------------------------------------------------------------------
# adding an option: the spec and run() are all that change
# --------------------------------------------------------------------------------------------------


def _echo_run(cfg, data, output, *, repeat=1, parent_run_id=None):
    """A stage defined in this test: records what it was given."""
    Path(output).mkdir(parents=True, exist_ok=True)
    record = {"data": data, "repeat": repeat, "parent_run_id": parent_run_id, "seed": cfg.pretrain.seed}
    (Path(output) / "result.json").write_text(json.dumps(record))
    return record


ECHO = StageSpec(
    name="echo", module="blip_test_echo_stage", description="a stage defined in a test",
    inputs=(Option("--data", "datasets", kind="input", nargs="+", required=True),),
    outputs=(Option("--output", "output directory", kind="output", required=True),),
    config=("pretrain.seed",))


@pytest.fixture
def echo_stage(monkeypatch):
    """The echo stage with one more option, ``--repeat``, added to its spec (its run() already takes it)."""
    spec_ = StageSpec(**{**{f: getattr(ECHO, f) for f in ("name", "module", "description", "inputs", "outputs",
                                                             "config")},
                         "options": (Option("--repeat", "how many times", type=int, default=1),)})
    module = types.ModuleType(spec_.module)
    module.SPEC, module.run = spec_, _echo_run
    monkeypatch.setitem(sys.modules, spec_.module, module)
    monkeypatch.setitem(spec.MODULES, "echo", spec_.module)
    monkeypatch.setitem(launch.STAGES, "echo", spec_.module)
    return spec_


def test_an_option_added_to_a_spec_reaches_argparse_torchx_and_the_pipeline(echo_stage, tmp_path, monkeypatch):
    from pipelines import steps

    monkeypatch.chdir(tmp_path)
    # argparse: the stage's main parser has it, with its type and default, and run() receives it
    parser = echo_stage.parser()
    assert "--repeat" in parser.format_help()
    args = parser.parse_args(["--data", "d", "--output", "o", "--repeat", "3"])
    assert args.repeat == 3 and parser.parse_args(["--data", "d", "--output", "o"]).repeat == 1
    assert echo_stage.run_kwargs(args) == {"data": ["d"], "output": "o", "repeat": 3, "parent_run_id": None}
    # TorchX: the job runs the stage module with it; the spec's inputs and outputs are made absolute
    app = launch.build_app("echo", echo_stage.argv({"data": ["d"], "output": "o", "repeat": 3}), procs_per_node=1)
    command = shlex.split(app.roles[0].args[-1])  # bash -c "torchrun ... -m MODULE ARGS"
    assert command[command.index("-m") + 1:] == ["blip_test_echo_stage", "--data", str(tmp_path / "d"), "--output",
                                                  str(tmp_path / "o"), "--repeat", "3"]
    # the pipeline's adapter: the TorchX argument list, and the inline run with the same values
    values = {"data": ["s3://b/d"], "output": "s3://b/o", "repeat": 3}
    assert steps.stage_argv("echo", values, "params.yaml", ["pretrain.seed=7"]) == [
        "--data", "s3://b/d", "--output", "s3://b/o", "--repeat", "3", "--config", "params.yaml",
        "--set", "pretrain.seed=7"]
    cfg = load_config(None, ["pretrain.seed=7"])
    out = str(tmp_path / "inline")
    res = steps.run_stage("echo", {**values, "output": out}, cfg=cfg, ctx={"parent_run_id": "p1"}, params_file="",
                          overrides=[])
    assert res == {"data": ["s3://b/d"], "repeat": 3, "parent_run_id": "p1", "seed": 7}
    # dvc.yaml's params for it come from the same spec
    assert echo_stage.sections() == ["pretrain.seed"]


def test_kfp_steps_build_the_stage_argv_from_the_spec():
    """The pipeline's training and CapFilt steps launch exactly the spec's argument list."""
    from pipelines import steps

    argv = steps.stage_argv("finetune", {"task": "vqa", "init": "s3://b/pre", "data": ["s3://b/v"],
                                         "output": "s3://b/o", "stage_name": "finetune_vqa_noisy",
                                         "parent_run_id": "r1"}, "/app/params.yaml", ["a.b=1"])
    parsed = spec.get("finetune").parser().parse_args(argv)
    assert (parsed.task, parsed.init, parsed.data, parsed.output, parsed.stage_name, parsed.parent_run_id) == (
        "vqa", "s3://b/pre", ["s3://b/v"], "s3://b/o", "finetune_vqa_noisy", "r1")
    assert parsed.config == "/app/params.yaml" and parsed.overrides == ["a.b=1"]
    with pytest.raises(KeyError, match="missing required option"):
        steps.stage_argv("capfilt", {"output": "s3://b/o"})
