"""``python -m components.tracking check|start|end|url``: check tracking, start and end pipeline (parent) runs."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable

from blip_core.errors import UserError
from blip_core.redact import redact
from components.tracking.store import (
    DEFAULT_EXPERIMENT,
    TrackingError,
    _client,
    check_tracking,
    end_pipeline_run,
    experiment_url,
    resolve_tracking_uri,
    start_pipeline_run,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m components.tracking",
                                description="Check MLflow tracking and start/end pipeline (parent) runs.")
    p.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="fail (exit 2) when the tracking server/store is unusable")
    c.add_argument("--timeout", type=float, default=10.0)
    s = sub.add_parser("start", help="create a parent run and print its id (for BLIP_PARENT_RUN_ID)")
    s.add_argument("--name", default=None)
    s.add_argument("--experiment", default=None, help="default: MLFLOW_EXPERIMENT_NAME or blip-capfilt")
    s.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE")
    u = sub.add_parser("url", help="print the MLflow UI link that opens the experiment (or a run) on its runs")
    u.add_argument("--ui", default="http://127.0.0.1:5000", help="the UI's address (default: mlflow ui's)")
    u.add_argument("--experiment", default=None, help="default: MLFLOW_EXPERIMENT_NAME or blip-capfilt")
    u.add_argument("--run-id", default=None)
    e = sub.add_parser("end", help="end a parent run (default: BLIP_PARENT_RUN_ID)")
    e.add_argument("run_id", nargs="?", default=None)
    e.add_argument("--status", default="FINISHED", choices=["FINISHED", "FAILED", "KILLED"])
    return p


def _parse_tags(items: Iterable[str]) -> dict[str, str]:
    tags = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--tag expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        tags[k] = v
    return tags


def main(argv: Iterable[str] | None = None) -> int:
    args = _parser().parse_args(list(argv) if argv is not None else None)
    try:
        if args.cmd == "check":
            print(redact(check_tracking(args.tracking_uri, timeout=args.timeout)))
        elif args.cmd == "url":
            name = args.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
            exp = _client(args.tracking_uri).get_experiment_by_name(name)
            if exp is None:
                raise TrackingError(f"no MLflow experiment {name!r} at {redact(resolve_tracking_uri(args.tracking_uri))}")
            print(experiment_url(args.ui, exp.experiment_id, args.run_id))
        elif args.cmd == "start":
            print(start_pipeline_run(args.name, args.experiment, _parse_tags(args.tag), args.tracking_uri))
        else:
            end_pipeline_run(args.run_id, args.status, args.tracking_uri)
    except UserError as err:
        print(f"tracking: error: {err}", file=sys.stderr)
        return 2
    return 0
