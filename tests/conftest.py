"""Shared fixtures: seeded RNGs, torch defaults restored, and small helpers used across test modules."""

from __future__ import annotations

import logging
import os

# One BLAS/OpenMP thread per process: tests start several processes at once (DDP ranks, stages, servers) and
# oversubscribed OpenMP threads on a 2-core machine make every one of them many times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import random  # noqa: E402

import huggingface_hub.utils.logging  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers.utils.logging  # noqa: E402

from blip_core.config import load_config  # noqa: E402
from components import ingest  # noqa: E402

# transformers and huggingface_hub give their library loggers a StreamHandler bound to sys.stderr as it is when
# their logging is first set up. Set up here, that is pytest's capture stream, open for the whole session; set up
# inside a test using capsys, it would be that test's stream, closed when the test ends, and every later log line
# of those libraries would print a "Logging error" traceback into another test's stderr.
transformers.utils.logging.get_logger("transformers")
huggingface_hub.utils.logging.get_logger("huggingface_hub")


@pytest.fixture(autouse=True)
def _drop_log_handlers_on_closed_streams():
    """A library that sets up its logging while a test captures output binds its StreamHandler to that test's
    stream, which pytest closes when the test ends. Such handlers are dropped after each test, so that later log
    lines do not print "Logging error" tracebacks into another test's stderr."""
    yield
    loggers = [logging.getLogger(), *(x for x in logging.Logger.manager.loggerDict.values()
                                      if isinstance(x, logging.Logger))]
    for logger in loggers:
        for handler in list(logger.handlers):
            if getattr(getattr(handler, "stream", None), "closed", False):
                logger.removeHandler(handler)


@pytest.fixture(autouse=True)
def _seed_and_restore():
    """Seed every RNG and restore torch's global state after each test."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    threads = torch.get_num_threads()
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------
# S3: a real S3-compatible HTTP server (moto) on 127.0.0.1, and a proxy in front of it that fails requests
# --------------------------------------------------------------------------------------------------

S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}
_S3_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """Start moto's S3 server on 127.0.0.1 (a free port) for the session and yield its endpoint URL.

    For the session it sets test credentials (``testing``/``testing``, region ``us-east-1``) and points the
    AWS config files at an empty directory, so nothing can reach real AWS. It does not set the endpoint:
    use ``s3_env`` (``AWS_ENDPOINT_URL[_S3]``) or pass the URL to the tool under test (MLflow, DVC).
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    aws_dir = tmp_path_factory.mktemp("aws-config")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in S3_TEST_ENV.items():
            mp.setenv(k, v)
        for k in _S3_UNSET:
            mp.delenv(k, raising=False)
        mp.setenv("AWS_CONFIG_FILE", str(aws_dir / "config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(aws_dir / "credentials"))
        yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point boto3 (:mod:`components.storage`, and the dataset reader through its opener) at the moto server for
    one test; yields the URL."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    return s3_server


@pytest.fixture
def s3_bucket(s3_env):
    """A new, empty bucket on the moto server (unique name per test); yields its name."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1").create_bucket(Bucket=name)
    return name


class FlakyProxy:
    """An HTTP proxy on 127.0.0.1 that answers 503 SlowDown (or, with ``status=500``, 500 InternalError) to
    chosen requests and forwards the rest.

    Requests number 0, 1, ... in arrival order; request ``i`` fails when ``i < fail_first`` or, with
    ``fail_every = k > 0``, when ``i % k == k - 1``. ``requests`` and ``failed`` count what happened.
    """

    def __init__(self, target: str, fail_first: int = 0, fail_every: int = 0, status: int = 503) -> None:
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        t = urlsplit(target)
        self.fail_first, self.fail_every = fail_first, fail_every
        code = {503: b"SlowDown", 500: b"InternalError"}[status]
        self.requests = self.failed = 0
        lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                with lock:
                    i = proxy.requests
                    proxy.requests += 1
                    fail = i < proxy.fail_first or (proxy.fail_every > 0 and i % proxy.fail_every == proxy.fail_every - 1)
                    proxy.failed += fail
                if fail:
                    msg = b"<?xml version='1.0'?><Error><Code>" + code + b"</Code><Message>injected</Message></Error>"
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(msg)
                    return
                skip = {"connection", "transfer-encoding", "expect", "content-length", "keep-alive"}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(t.hostname, t.port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status)
                    for k, v in resp.getheaders():
                        if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                            self.send_header(k, v)
                    length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                    self.send_header("Content-Length", length or str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def flaky_s3(s3_env, monkeypatch):
    """Factory: ``flaky_s3(fail_first=3, fail_every=0, status=503)`` starts a :class:`FlakyProxy` in front of
    the moto server and points ``AWS_ENDPOINT_URL[_S3]`` at it; returns the proxy (``.url``, ``.failed``)."""
    proxies = []

    def make(fail_first: int = 0, fail_every: int = 0, status: int = 503) -> FlakyProxy:
        p = FlakyProxy(s3_env, fail_first, fail_every, status)
        proxies.append(p)
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", p.url)
        return p

    yield make
    for p in proxies:
        p.close()


# ------------------------------------------------------------------ toy-web datasets for the stage tests


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    """``{"web": dir, "human": dir, "test": dir}`` of small toy-web datasets."""
    root = tmp_path_factory.mktemp("toydata")
    cfg = load_config(None, ["ingest.resolution=32"])
    out = {}
    for split, n in (("web", 64), ("human", 24), ("test", 12)):
        out[split] = str(root / split)
        ingest.run(cfg, f"toyweb://?split={split}&n={n}&seed=1&size=32", out[split], progress=False)
    return out


@pytest.fixture
def no_tracking(monkeypatch):
    monkeypatch.setenv("BLIP_TRACKING", "0")
