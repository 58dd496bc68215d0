"""Following a TorchX job for :mod:`components.launch`: streaming its log lines, cancelling it on SIGTERM,
removing the job an earlier attempt left, and the message of a failed job."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blip_core.errors import UserError
from components.launch_k8s import _rename_job, secure_pods

log = logging.getLogger("components.launch")

_EMPTY_RANK_LINE = re.compile(r"^\[\d+\]:\s*$")
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
_ERROR_LINE = re.compile(r"(\b[A-Z]\w*(Error|Exception)\b(:|$)|\berror:)")
_RANK_PREFIX = re.compile(r"^(\[\d+\]:)?(\[rank\d+\]:)?\s*")
_ELASTIC_NOISE = re.compile(r"torch\.distributed\.elastic|ChildFailedError|elastic/errors|error_file|"
                            r"To enable traceback|^\s*\[\d+\]:\s*$|^=+$")


class _LogFollower:
    """Streams one replica's log lines to ``sink`` in a thread and keeps the last ones."""

    def __init__(self, runner, handle: str, role: str, replica: int, prefix: str,
                 sink: Callable[[str], None] | None, keep: int, done: threading.Event,
                 muted: threading.Event) -> None:
        self.lines: deque[str] = deque(maxlen=keep)
        self.errors: deque[str] = deque(maxlen=keep)
        self._args = (runner, handle, role, replica)
        self._prefix, self._sink, self._done = prefix, sink, done
        self._muted = muted  # set: lines are kept but no longer sent to the sink
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"log-{prefix}")
        self.thread.start()

    def _run(self) -> None:
        runner, handle, role, replica = self._args
        seen = 0
        while True:  # the pod (or log file) may not exist yet; retry until the job has ended
            try:
                n = 0
                for line in runner.log_lines(handle, role, k=replica, should_tail=True):
                    n += 1
                    if n <= seen:  # a re-opened stream starts from the beginning
                        continue
                    seen = n
                    self._add(line.rstrip("\n"))
                return
            except Exception:  # noqa: BLE001 - not there yet (pending pod, no file): try again
                if self._done.wait(2.0):
                    return

    def _add(self, line: str) -> None:
        if not line.strip() or _EMPTY_RANK_LINE.match(line):
            return
        self.lines.append(line)
        if _ERROR_LINE.search(line) and not _ELASTIC_NOISE.search(line):
            self.errors.append(line)
        if self._sink is not None and not self._muted.is_set():
            self._sink(f"[{self._prefix}] {line}")


def _collect(runner, handle: str, role: str, replica: int, keep: int) -> list[str]:
    try:
        return [ln.rstrip("\n") for ln in deque(runner.log_lines(handle, role, k=replica), maxlen=keep)]
    except Exception:  # noqa: BLE001 - logs may be gone (pod deleted): report what was streamed
        return []


def _stderr_sink(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class _Terminated(BaseException):
    """Raised in the main thread by SIGTERM while a job is followed (see :func:`_cancel_on_sigterm`)."""


@contextlib.contextmanager
def _cancel_on_sigterm():
    """Turn SIGTERM (Kubernetes deleting or evicting the pipeline step) into :class:`_Terminated`, so that the
    job is cancelled before this process ends. Signal handlers can only be set in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Terminated(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _wait_until(predicate: Callable[[], bool], timeout_s: float, poll_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


def _stop_existing(runner, handle: str, stage: str, *, timeout_s: float = 300.0, poll_s: float = 2.0) -> None:
    """Cancel (if still running) and delete the job ``handle`` left by an earlier attempt, and wait until it is
    gone, so that its name is free and it no longer writes to the output."""
    status = runner.status(handle)
    if status is None:
        return
    if status.state.name not in TERMINAL:
        log.warning("%s: job %s of an earlier attempt is still %s; cancelling it", stage, handle, status.state.name)
        runner.cancel(handle)

        def stopped() -> bool:
            st = runner.status(handle)
            return st is None or st.state.name in TERMINAL

        if not _wait_until(stopped, timeout_s, poll_s):
            raise UserError(f"{stage}: the earlier job {handle} did not stop within {timeout_s:.0f} s of being "
                            "cancelled; delete it (kubectl delete vcjob) and retry")
    runner.delete(handle)
    if not _wait_until(lambda: runner.status(handle) is None, timeout_s, poll_s):
        raise UserError(f"{stage}: the earlier job {handle} was not deleted within {timeout_s:.0f} s; retry later")
    log.info("%s: removed the earlier job %s", stage, handle)


def _failure_message(res: LaunchResult, status, errors: list[str]) -> str:
    head = f"{res.stage}: TorchX job {res.handle} {res.state}"
    if status is not None and status.msg and status.msg != "<NONE>":
        head += f" ({status.msg})"
    if errors:
        head += ": " + _RANK_PREFIX.sub("", errors[0], count=1)
    where = f"; logs: {res.ui_url or res.log_dir}" if (res.ui_url or res.log_dir) else ""
    parts = [head + where]
    if errors:
        parts.append("error lines:\n  " + "\n  ".join(errors[-8:]))
    if res.last_lines:
        parts.append("last log lines:\n  " + "\n  ".join(res.last_lines))
    parts.append(f"a relaunch resumes from the newest checkpoint in {res.output}, if there is one")
    return "\n".join(parts)


def package_root() -> Path:
    """The directory holding the ``components`` package (repository root or site-packages)."""
    return Path(__file__).resolve().parent.parent


_CWD_LOCK = threading.Lock()


@contextlib.contextmanager
def _job_cwd(scheduler: str):
    """local_cwd takes the job's working directory from ``os.getcwd()`` at submission."""
    if scheduler != "local_cwd":
        yield
        return
    with _CWD_LOCK:
        old = os.getcwd()
        os.chdir(package_root())
        try:
            yield
        finally:
            os.chdir(old)


@dataclass
class LaunchResult:
    """What :func:`launch` did: the job's handle and final state (or, for a dry run, the request)."""

    stage: str
    scheduler: str
    handle: str | None
    state: str
    output: str | None
    app_name: str
    seconds: float = 0.0
    log_dir: str | None = None
    ui_url: str | None = None
    last_lines: list[str] = field(default_factory=list)
    request: Any = None  # dry run: the scheduler's request (kubernetes: the Volcano Job as a dict)
    scheduler_cfg: dict[str, Any] = field(default_factory=dict)  # the TorchX scheduler options used

    @property
    def succeeded(self) -> bool:
        return self.state == "SUCCEEDED"


def _submit_error(stage: str, scheduler: str, e: Exception) -> UserError:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return UserError(f"{stage}: cannot submit the TorchX job to {scheduler}: {msg}")


class _Job:
    """One TorchX job of :func:`launch`: its request, its run (submit, follow, cancel) and its result."""

    def __init__(self, runner, stage: str, scheduler: str, app, cfg: dict[str, Any], output: str | None,
                 poll_s: float) -> None:
        self.runner, self.stage, self.scheduler, self.app, self.cfg = runner, stage, scheduler, app, cfg
        self.output, self.poll_s = output, poll_s
        self.handle: str | None = None
        self.info = None

    def request(self, namespace: str, name: str) -> None:
        """Build the scheduler request; on Kubernetes name the job ``name`` and secure its pods."""
        from torchx.specs.builders import make_app_handle

        try:
            with _job_cwd(self.scheduler):
                self.info = self.runner.dryrun(self.app, self.scheduler, cfg=self.cfg)
            if self.scheduler == "kubernetes":
                self.info.request.resource = secure_pods(_rename_job(self.info.request.resource, name))
                self.handle = make_app_handle(self.scheduler, self.runner.name(), f"{namespace}:{name}")
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - no cluster, no permission, bad spec: one clear line
            raise _submit_error(self.stage, self.scheduler, e) from None

    def run(self, done: threading.Event, sink: Callable[[str], None] | None, tail: int, timeout_s: float | None,
            t0: float):
        """Submit the job, stream its logs and wait until it ends; cancel it on a timeout, an error or SIGTERM.
        Returns its final status and the log followers."""
        status = None
        muted = threading.Event()
        try:
            with _cancel_on_sigterm():
                self._submit()
                role = self.app.roles[0]
                log.info("%s: launched %s (%d replicas)", self.stage, self.handle, role.num_replicas)
                followers = [_LogFollower(self.runner, self.handle, role.name, k, f"{self.app.name}/{k}", sink, tail,
                                          done, muted) for k in range(role.num_replicas)]
                status = self._wait(timeout_s, t0)
        except BaseException as e:
            if isinstance(e, _Terminated):  # what the cancelled job prints while it stops (torchrun's own
                muted.set()                 # SignalException traceback) is not this launch's error
            if self.handle is not None and (status is None or status.state.name not in TERMINAL):
                with contextlib.suppress(Exception):
                    self.runner.cancel(self.handle)
            done.set()
            if isinstance(e, _Terminated):
                raise UserError(f"{self.stage}: stopped by {e}; cancelled TorchX job {self.handle} "
                                "(a relaunch resumes from its last checkpoint)") from None
            raise
        done.set()  # followers still waiting for a log to appear give up; streaming ones finish their stream
        return status, followers

    def _submit(self) -> None:
        try:
            if self.handle is not None:
                _stop_existing(self.runner, self.handle, self.stage, poll_s=self.poll_s)
            with _job_cwd(self.scheduler):
                self.handle = self.runner.schedule(self.info)
        except (UserError, _Terminated):
            raise
        except Exception as e:  # noqa: BLE001 - no cluster, no permission, bad spec: one clear line
            raise _submit_error(self.stage, self.scheduler, e) from None

    def _wait(self, timeout_s: float | None, t0: float):
        misses = 0
        while True:
            try:
                status = self.runner.status(self.handle)
                misses = 0
            except Exception as e:  # noqa: BLE001 - a hiccup of the API server is not the job's failure
                status = None
                misses += 1
                if misses >= 10:
                    raise UserError(f"{self.stage}: cannot get the status of TorchX job {self.handle}: {e}") from None
                log.warning("%s: status of %s unavailable (%s); retrying", self.stage, self.handle, e)
            if status is not None and status.state.name in TERMINAL:
                return status
            if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                self.runner.cancel(self.handle)
                raise UserError(f"{self.stage}: TorchX job {self.handle} did not finish in {timeout_s:.0f} s; "
                                "cancelled (relaunch to resume from its last checkpoint)")
            time.sleep(self.poll_s)

    def result(self, status, followers, tail: int, t0: float, log_dir: str | None):
        """The :class:`LaunchResult` and the job's error lines (streamed, or read back from its logs)."""
        role = self.app.roles[0]
        for f in followers:
            f.thread.join(timeout=10)
        last: list[str] = []
        errors: list[str] = []
        for k, f in enumerate(followers):
            lines = list(f.lines) or _collect(self.runner, self.handle, role.name, k, tail)
            last += lines
            errors += [ln for ln in f.errors if ln not in errors]
            if not f.lines:
                errors += [ln for ln in lines if _ERROR_LINE.search(ln) and not _ELASTIC_NOISE.search(ln)]
        result = LaunchResult(self.stage, self.scheduler, self.handle, status.state.name, self.output, self.app.name,
                              time.monotonic() - t0, log_dir=log_dir, ui_url=status.ui_url, last_lines=last[-tail:],
                              scheduler_cfg=self.cfg)
        return result, errors
