"""Where a command-line flow run reports, and how its console reads.

reporting(): the Prefect API the run's states and logs go to (PREFECT_API_URL when set; else the project's
server when `deepcluster serve start` runs, so the run shows in its UI; else a temporary server that
dies with the run), with known errors shown on the console as their message only.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import subprocess
from collections.abc import Iterator

from pipeline import project_server_url
from stages.core.errors import StageError, TransientError, first_line


@contextlib.contextmanager
def reporting() -> Iterator[None]:
    from prefect.logging.handlers import PrefectConsoleHandler
    from prefect.settings import PREFECT_API_URL, temporary_settings

    for handler in logging.getLogger().handlers:  # known errors on the console: their message only
        if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter,
                                                                         _WithoutTracebackForKnownErrors):
            handler.setFormatter(_WithoutTracebackForKnownErrors(handler.formatter or logging.Formatter()))
    url = None if os.environ.get("PREFECT_API_URL") else project_server_url()
    if not url and not PREFECT_API_URL.value():
        start_temporary_server()  # instead of Prefect, so that it dies with this process
    with temporary_settings(updates={PREFECT_API_URL: url}) if url else contextlib.nullcontext():
        yield


def start_temporary_server() -> None:
    """Start the temporary Prefect server as Prefect would on its first API call (SubprocessASGIServer, a
    uvicorn child), registered as Prefect's own instance so Prefect reuses it.

    Prefect stops its server at exit, but a flow killed with kill -9 (or by the OOM killer) never exits
    normally and the server (about 200 MB) would run on: with PR_SET_PDEATHSIG the kernel stops it when
    this process dies. Prefect builds the command and its environment in one method with no hook for a
    preexec_fn, so subprocess.Popen is wrapped for that one call rather than Prefect's command copied.
    """
    import ctypes
    import signal

    from prefect.server.api.server import SubprocessASGIServer

    parent = os.getpid()

    def die_with_parent() -> None:  # in the child, before exec: SIGTERM when `parent` dies, however it dies
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    class ServerDyingWithFlow(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen:
            popen = subprocess.Popen
            subprocess.Popen = functools.partial(popen, preexec_fn=die_with_parent)
            try:
                return super()._run_uvicorn_command()
            finally:
                subprocess.Popen = popen

    server = ServerDyingWithFlow()  # SubprocessASGIServer() now returns it: one instance per port (None: any)
    try:
        server.start()
    except RuntimeError as e:
        variable = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
        raise StageError(f"the temporary Prefect server did not answer within {os.environ.get(variable)} s "
                         f"({first_line(e)}): on a busy machine wait longer (export {variable}=600), or start "
                         "one server for all runs with `deepcluster serve start`") from e


class _WithoutTracebackForKnownErrors(logging.Formatter):
    """Prefect logs a failed flow run with its traceback; on the console a StageError or TransientError
    shows as its message only, which says what to do (the Prefect UI keeps the traceback)."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and isinstance(record.exc_info[1], (StageError, TransientError)):
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
        return self.inner.format(record)

