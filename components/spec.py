"""Declarative stage specs: one :class:`StageSpec` per stage, the single source of its command line.

A stage module declares ``SPEC = StageSpec(...)``: its URI inputs and outputs, its plain options and the config
keys it reads. From the spec come

- the stage's ``argparse`` parser (:meth:`StageSpec.parser`) and the keyword arguments of its ``run``
  (:meth:`StageSpec.run_kwargs`), so ``main`` needs no option of its own;
- the stage's argument list built from values (:meth:`StageSpec.argv`): what a TorchX job runs and what a
  pipeline step passes, and the options whose values are paths (:attr:`StageSpec.path_options`: made absolute
  for a local TorchX job);
- the ``params:`` list of the stage in ``dvc.yaml`` (:meth:`StageSpec.sections`, checked by ``tests/test_spec.py``).

Values are keyed by each option's ``dest`` (``--vit-init`` -> ``vit_init``) and hold what ``argparse`` would
produce for the option (a list for ``nargs``/``append`` options, a bool for a flag).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# stage -> module declaring its SPEC
MODULES: dict[str, str] = {
    "ingest": "components.ingest",
    "pretrain": "components.pretrain",
    "finetune": "components.finetune",
    "capfilt": "components.capfilt",
    "evaluate": "components.evaluate",
    "register": "components.register",
}
# options every stage shares, handled by the stage's main (config) or by run (parent run): never in a spec
CONFIG_DESTS = ("config", "overrides")
_UNSET = object()


@dataclass(frozen=True)
class Option:
    """One command-line option of a stage.

    ``kind``: ``input`` / ``output`` (URIs: local paths or ``s3://``; made absolute for a local TorchX job) or
    ``option``. ``param``: the keyword of ``run`` it fills (default: ``dest``; ``""``: none). ``invert``: a flag
    whose value reaches ``run`` negated (``--no-resume`` -> ``resume``). ``convert``: applied to the value before
    ``run`` (e.g. ``NAME=URI`` strings to a dict).
    """

    flag: str
    help: str = ""
    kind: str = "option"
    type: Callable[[str], Any] | None = None
    default: Any = None
    required: bool = False
    nargs: str | None = None
    action: str | None = None  # "store_true" or "append"
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None
    metavar: str | None = None
    dest: str = ""
    param: str | None = None
    invert: bool = False
    convert: Callable[[Any], Any] | None = None

    def __post_init__(self) -> None:
        if not self.flag.startswith("--"):
            raise ValueError(f"option {self.flag!r}: flags start with --")
        if self.kind not in ("input", "output", "option"):
            raise ValueError(f"option {self.flag}: kind must be input, output or option")
        if not self.dest:
            object.__setattr__(self, "dest", self.flag[2:].replace("-", "_"))
        if self.param is None:
            object.__setattr__(self, "param", self.dest)

    @property
    def is_path(self) -> bool:
        return self.kind in ("input", "output")

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        kw: dict[str, Any] = {"dest": self.dest, "help": self.help}
        if self.action:
            kw["action"] = self.action
        if self.action != "store_true":
            if self.type is not None:
                kw["type"] = self.type
            if self.nargs:
                kw["nargs"] = self.nargs
            if self.metavar:
                kw["metavar"] = self.metavar
            choices = self.choices() if callable(self.choices) else self.choices
            if choices is not None:
                kw["choices"] = list(choices)
        if self.required:
            kw["required"] = True
        else:
            kw["default"] = self.default if self.action != "store_true" else bool(self.default)
        parser.add_argument(self.flag, **kw)

    def tokens(self, value: Any) -> list[str]:
        """The argument tokens giving this option ``value`` (none for an unset value or a false flag)."""
        if value is None:
            return []
        if self.action == "store_true":
            return [self.flag] if value else []
        if self.action == "append":
            return [t for v in value for t in (self.flag, str(v))]
        if self.nargs in ("+", "*"):
            values = [str(v) for v in value]
            return [self.flag, *values] if values else []
        return [self.flag, str(value)]


@dataclass(frozen=True)
class StageSpec:
    """A stage: its module, URI inputs and outputs, plain options and the config keys it reads.

    ``config``: dotted keys of the config the stage reads (a section such as ``evaluate`` or one key such as
    ``data.image_size``); an entry may name an option's value in braces (``finetune_{task}``).
    ``tracking``: the stage takes ``--parent-run-id`` (its MLflow parent run).
    """

    name: str
    module: str
    description: str
    inputs: tuple[Option, ...] = ()
    outputs: tuple[Option, ...] = ()
    options: tuple[Option, ...] = ()
    config: tuple[str, ...] = ()
    tracking: bool = True
    prog: str = ""
    extra: Callable[[dict[str, Any]], tuple[str, ...]] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for o in self.inputs + self.outputs:
            if not o.is_path:
                raise ValueError(f"{self.name}: {o.flag} is listed as an input/output but has kind {o.kind!r}")
        dests = [o.dest for o in self.all_options]
        if len(set(dests)) != len(dests):
            raise ValueError(f"{self.name}: two options share a dest")

    @property
    def all_options(self) -> tuple[Option, ...]:
        parent = (Option("--parent-run-id", "MLflow parent run (default: $BLIP_PARENT_RUN_ID)"),) if self.tracking \
            else ()
        return self.inputs + self.outputs + self.options + parent

    @property
    def path_options(self) -> frozenset[str]:
        """The flags whose values are local paths or URIs (``--config`` included)."""
        return frozenset({"--config", *(o.flag for o in self.all_options if o.is_path)})

    def option(self, dest: str) -> Option:
        for o in self.all_options:
            if o.dest == dest:
                return o
        raise KeyError(f"{self.name} has no option {dest!r}")

    def parser(self, prog: str | None = None) -> argparse.ArgumentParser:
        """The stage's parser: every option of the spec, ``--config``/``--set``, one-line usage errors."""
        from components.cli import add_config_args

        p = argparse.ArgumentParser(prog=prog or self.prog or f"blip {self.name}", description=self.description)
        for o in self.inputs + self.outputs + self.options:
            o.add_to(p)
        add_config_args(p, tracking=self.tracking)
        return p

    def defaults(self) -> dict[str, Any]:
        return {o.dest: (bool(o.default) if o.action == "store_true" else o.default) for o in self.all_options}

    def values(self, values: Mapping[str, Any] | argparse.Namespace) -> dict[str, Any]:
        """``values`` over the defaults, refusing names that are no option of the stage."""
        given = dict(vars(values) if isinstance(values, argparse.Namespace) else values)
        for d in CONFIG_DESTS:
            given.pop(d, None)
        known = self.defaults()
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise KeyError(f"{self.name}: unknown option(s) {', '.join(unknown)}")
        return {**known, **given}

    def argv(self, values: Mapping[str, Any], *, config: str | None = None,
             overrides: Sequence[str] = ()) -> list[str]:
        """The stage's arguments for ``values`` (by dest; missing ones keep their defaults and are left out),
        then ``--config`` and one ``--set`` per override."""
        given = dict(values)
        missing = [o.flag for o in self.all_options if o.required and given.get(o.dest) is None]
        if missing:
            raise KeyError(f"{self.name}: missing required option(s) {', '.join(missing)}")
        self.values(given)  # unknown names
        out: list[str] = []
        for o in self.all_options:
            if o.dest in given and given[o.dest] != o.default:
                out += o.tokens(given[o.dest])
        out += ["--config", config] if config else []
        for item in overrides or ():
            out += ["--set", str(item)]
        return out

    def run_kwargs(self, values: Mapping[str, Any] | argparse.Namespace) -> dict[str, Any]:
        """The keyword arguments of the stage's ``run`` for ``values`` (parsed arguments or a dict by dest)."""
        full = self.values(values)
        out: dict[str, Any] = {}
        for o in self.all_options:
            if not o.param:
                continue
            v = full[o.dest]
            if o.invert:
                v = not v
            if o.convert is not None and v is not None:
                v = o.convert(v)
            out[o.param] = v
        return out

    def sections(self, values: Mapping[str, Any] | None = None) -> list[str]:
        """The config keys the stage reads with ``values`` (dvc.yaml's ``params:`` of the stage)."""
        full = self.values(values or {})
        keys = [k.format(**full) for k in self.config]
        if self.extra is not None:
            keys += list(self.extra(full))
        return keys


def get(name: str) -> StageSpec:
    """The spec of stage ``name`` (imports its module)."""
    if name not in MODULES:
        raise KeyError(f"unknown stage {name!r}: one of {', '.join(MODULES)}")
    return importlib.import_module(MODULES[name]).SPEC
