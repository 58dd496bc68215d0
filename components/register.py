"""Register stage: log the final model in MLflow, register a new version, promote it only when it is better.

``blip register --model URI --metrics URI --candidate NAME [--baseline NAME --min-gain G] [--name blip-capfilt]
[--alias champion] [--metric mean_r1] [--output URI]``

- ``--model``: the model to register (a checkpoint directory or a training stage output, local or s3);
- ``--metrics``: the evaluate stage's ``metrics.json`` (or its output directory); ``--candidate`` names the
  model's entry under ``models`` there;
- ``--metric`` (default ``evaluate.metric``, ``mean_r1``): the metric compared, higher is better;
- ``--baseline`` and ``--min-gain`` (the promotion gate, the same for ``dvc repro`` and the Kubeflow pipeline):
  the candidate is registered only when its metric minus the baseline's is strictly above ``--min-gain``
  (default 0); a tie, a loss or a NaN metric registers nothing and the stage still succeeds.

The model is logged as an MLflow pyfunc model in a stage run ``register`` and registered as a new version of
``--name``. The version carries its evaluate metrics as tags ``blip.metric.<key>`` (and ``blip.candidate``,
``blip.metrics_uri``), so a later registration can compare against them. The alias (``champion``) moves to
the new version only when its metric is strictly higher than the value recorded on the version that holds
the alias (or when no version holds it yet); otherwise the alias stays and the reason says why. When the
alias holder has no recorded value for the metric, the alias stays unless ``--force`` is given.

With tracking off (``BLIP_TRACKING=0``) nothing is registered: the result is ``promoted=False`` with the
reason "tracking disabled", and the stage still succeeds, so a local ``dvc repro`` without MLflow completes.
With ``--output``, the decision is written to ``register.json`` there.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

from blip_core.config import Config, load_config, to_dict
from blip_core.errors import UserError
from components import storage, training
from components.cli import run_as_process
from components.spec import Option, StageSpec

log = logging.getLogger(__name__)

DECISION_FILE = "register.json"
METRIC_TAG = "blip.metric."


@dataclass
class RegisterResult:
    """The registration decision."""

    promoted: bool
    version: str | None
    reason: str
    name: str = ""
    alias: str = ""
    metric: str = ""
    value: float | None = None  # the candidate's metric
    champion_version: str | None = None  # the alias holder before this registration
    champion_value: float | None = None
    model_uri: str | None = None
    run_id: str | None = None
    baseline: str = ""  # the promotion gate: the model the candidate is compared with, and its gain
    gain: float | None = None
    min_gain: float | None = None


def read_candidate_metrics(metrics: str, candidate: str) -> dict[str, float]:
    """The numeric metrics of ``models.<candidate>`` in an evaluate ``metrics.json`` (file or directory)."""
    path = metrics if metrics.endswith(".json") else storage.join(metrics, "metrics.json")
    try:
        data = storage.read_json(path)
    except FileNotFoundError:
        raise UserError(f"{path}: evaluate metrics not found") from None
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise UserError(f"{path}: no 'models' section (is it the evaluate stage's metrics.json?)")
    if candidate not in models:
        raise UserError(f"{path}: no model named {candidate!r} (models: {', '.join(models) or 'none'})")
    return {k: float(v) for k, v in models[candidate].items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


def _recorded(tags: dict[str, str], metric: str) -> float | None:
    raw = tags.get(METRIC_TAG + metric)
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        return None
    return None if value is None or math.isnan(value) else value


def decide(value: float, champion_version: str | None, champion_value: float | None, metric: str,
           alias: str, force: bool = False) -> tuple[bool, str]:
    """Whether the new version takes the alias, and why (strictly higher wins; ties keep the champion)."""
    if champion_version is None:
        return True, f"no version holds @{alias} yet: the new version takes it ({metric}={value:.4g})"
    if force:
        return True, f"--force: @{alias} moves from version {champion_version} ({metric}={value:.4g})"
    if champion_value is None:
        return False, (f"@{alias} (version {champion_version}) has no recorded {metric}: kept; use --force to "
                       "promote anyway")
    if value > champion_value:
        return True, (f"{metric} {value:.4g} beats @{alias} version {champion_version} ({champion_value:.4g}): "
                      "promoted")
    return False, (f"{metric} {value:.4g} does not beat @{alias} version {champion_version} "
                   f"({champion_value:.4g}): @{alias} stays on version {champion_version}")


def promotion_gate(per_model: dict[str, dict[str, Any]], candidate: str, baseline: str, key: str, min_gain: float,
                   where: str = "") -> tuple[float, bool]:
    """``(gain, promote)``: the candidate's ``key`` minus the baseline's, and whether it is strictly above
    ``min_gain`` (a tie, a loss or a NaN metric does not promote)."""
    try:
        gain = float(per_model[candidate][key]) - float(per_model[baseline][key])
    except KeyError as e:
        raise UserError(f"{where or 'metrics'}: no {key} for model {e}") from None
    return gain, gain > min_gain


def _write_decision(output: str | None, result: RegisterResult) -> None:
    if output:
        path = output if output.endswith(".json") else storage.join(output, DECISION_FILE)
        storage.write_json(path, dataclasses.asdict(result))


def run(cfg: Config, model: str, metrics: str, candidate: str, name: str = "blip-capfilt", *,
        alias: str = "champion", metric: str | None = None, parent_run_id: str | None = None,
        output: str | None = None, force: bool = False, baseline: str | None = None,
        min_gain: float = 0.0) -> RegisterResult:
    """Register ``model`` as a new version of ``name``; move ``alias`` only if its metric beats the holder's.

    With ``baseline`` (a model of the same ``metrics``), nothing is registered unless the candidate's metric
    minus the baseline's is strictly above ``min_gain`` (:func:`promotion_gate`).
    """
    from components import tracking

    metric = metric or cfg.evaluate.metric
    values = read_candidate_metrics(metrics, candidate)
    if metric not in values:
        raise UserError(f"{metrics}: model {candidate!r} has no metric {metric!r} "
                        f"(has: {', '.join(sorted(values))})")
    value = values[metric]
    base: dict[str, Any] = {"name": name, "alias": alias, "metric": metric, "value": value}
    if baseline:
        per_model = {candidate: values, baseline: read_candidate_metrics(metrics, baseline)}
        gain, promote = promotion_gate(per_model, candidate, baseline, metric, min_gain, metrics)
        base.update(baseline=baseline, gain=gain, min_gain=min_gain)
        if not promote:
            result = RegisterResult(promoted=False, version=None, reason=(
                f"{candidate} {metric} - {baseline} {metric} = {gain:+.4g} is not above min_gain {min_gain:g}: "
                "not registered"), **base)
            _write_decision(output, result)
            return result
    if not tracking.tracking_enabled():
        result = RegisterResult(promoted=False, version=None, reason="tracking disabled (BLIP_TRACKING=0 or a "
                                "rank other than 0): registration needs MLflow; nothing registered", **base)
        _write_decision(output, result)
        return result
    if math.isnan(value):
        raise UserError(f"{metrics}: {candidate}.{metric} is NaN")
    model_dir = training.resolve_model_dir(model)
    config = {**to_dict(cfg), "inputs": {"model": model, "metrics": metrics, "candidate": candidate, "name": name,
                                         "alias": alias, "metric": metric}}
    with tracking.stage_run("register", config, parent_run_id=parent_run_id) as run_:
        holder = tracking.get_alias_version(name, alias, uri=run_.tracking_uri)
        champion_version = champion_value = None
        if holder is not None:
            champion_version = str(holder[0])
            champion_value = _recorded(tracking.get_version_tags(name, champion_version, uri=run_.tracking_uri),
                                       metric)
            if champion_value is None:  # an older version registered another way: its run's metric, if any
                run_value = holder[1].get(metric)
                champion_value = None if run_value is None or math.isnan(run_value) else float(run_value)
        run_.log_metrics(0, {f"{candidate}/{k}": v for k, v in values.items()})
        model_uri = run_.log_blip_model(model_dir)
        if run_.lost is not None:  # registering is this stage's work: without the server it cannot go on
            raise tracking.TrackingError(f"register: MLflow tracking was lost ({run_.lost}); nothing was registered")
        tags: dict[str, Any] = {METRIC_TAG + k: repr(v) for k, v in values.items()}
        tags.update({"blip.candidate": candidate, "blip.metrics_uri": metrics, "blip.model_source": model,
                     "blip.register_run_id": run_.run_id})
        version = str(tracking.register_model(model_uri, name, tags=tags, uri=run_.tracking_uri))
        promoted, reason = decide(value, champion_version, champion_value, metric, alias, force)
        if promoted:
            tracking.set_alias(name, alias, version, uri=run_.tracking_uri)
        tracking.set_version_tag(name, version, "blip.promoted", str(promoted).lower(), uri=run_.tracking_uri)
        result = RegisterResult(promoted=promoted, version=version, reason=reason, champion_version=champion_version,
                                champion_value=champion_value, model_uri=model_uri, run_id=run_.run_id, **base)
        run_.set_tags({"blip.register.promoted": str(promoted).lower(), "blip.register.reason": reason,
                       "blip.register.version": version})
        run_.log_dict(dataclasses.asdict(result), DECISION_FILE)
    _write_decision(output, result)
    return result


SPEC = StageSpec(
    name="register", module=__name__, description=__doc__.split("\n\n")[0],
    inputs=(Option("--model", "checkpoint directory or stage output (local or s3)", kind="input", required=True),
            Option("--metrics", "the evaluate stage's metrics.json (or its output directory)", kind="input",
                   required=True)),
    outputs=(Option("--output", "write register.json (the decision) to this directory or file", kind="output"),),
    options=(Option("--candidate", "the model's name in metrics.json (evaluate --model NAME=...)", required=True),
             Option("--name", "registered model name (default: blip-capfilt)", default="blip-capfilt"),
             Option("--alias", "alias moved when the new version is better", default="champion"),
             Option("--metric", "metric compared, higher is better (default: evaluate.metric)"),
             Option("--baseline", "register only if the candidate beats this model of metrics.json by more than "
                    "--min-gain"),
             Option("--min-gain", "the gain over --baseline the candidate needs (strictly above; default 0)",
                    type=float, default=0.0),
             Option("--force", "move the alias whatever the metrics say", action="store_true")),
    config=("evaluate.metric",))


def summary(res: dict) -> str:
    """The final line of the stage, from its decision (``register.json``): printed by ``blip register`` and by
    the pipeline's register step."""
    where = f"{res.get('name')} version {res.get('version')}" if res.get("version") else "not registered"
    return f"register: {where}; {'promoted' if res.get('promoted') else 'not promoted'}: {res.get('reason')}"


def main(argv: list[str] | None = None) -> int:
    args = SPEC.parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    res = run(cfg, **SPEC.run_kwargs(args))
    print(summary(dataclasses.asdict(res)))
    return 0


if __name__ == "__main__":
    run_as_process(main)
