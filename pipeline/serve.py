"""Serve the DeepCluster flow as a Prefect deployment on a local Prefect server.

    deepcluster serve start [--port 4200] [--name local]   # server + deployment, in the background
    source .prefect/env.sh                                 # PREFECT_HOME / PREFECT_API_URL for the Prefect CLI
    prefect deployment run 'deepcluster/local' --param epochs=3 --param overrides='{"cluster.k": 50}' --watch
    deepcluster serve status
    deepcluster serve stop                                 # (each also as python -m pipeline.serve ...)

Both processes bind to 127.0.0.1 and keep their state (database, pid files, logs) in .prefect/; each
deployment run executes in a subprocess in the project root, on its params.yaml, data and DVC repository.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline import alive, healthy, offline_environment, prefect_state_dir, project_root, project_server_url
from pipeline.versioning import subprocess_env

DEFAULT_NAME = "local"
FLOW_NAME = "deepcluster"


def _file(name: str) -> Path:
    return prefect_state_dir() / name


# ------------------------------------------------------------------ processes
def _read_pid(name: str) -> int | None:
    try:
        return int(_file(name).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _spawn(cmd: list[str], name: str, env: dict[str, str]) -> subprocess.Popen:
    """Start cmd in the background in its own session (so `stop` can signal its whole process group)."""
    with open(_file(f"{name}.log"), "ab") as log:
        proc = subprocess.Popen(cmd, cwd=project_root(), env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    _file(f"{name}.pid").write_text(f"{proc.pid}\n")
    return proc


def _wait(check, timeout: float, what: str, proc: subprocess.Popen, log: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None:
            _file(f"{log}.pid").unlink(missing_ok=True)
            tail = ""
            with contextlib.suppress(OSError):
                tail = "\n".join(_file(f"{log}.log").read_text(errors="replace").splitlines()[-30:])
            sys.exit(f"serve: {what} exited (status {proc.returncode}); the end of {_file(log + '.log')}:\n{tail}")
        if time.monotonic() > deadline:
            sys.exit(f"serve: {what} not ready after {timeout:.0f}s; see {_file(log + '.log')}")
        time.sleep(0.5)


def start(port: int, name: str) -> None:
    prefect_state_dir().mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}/api"
    # The offline environment (main() set it), this environment's python first on PATH (flow runs call `dvc
    # repro`, whose commands run `python -m ...`), and the server's address.
    env = {**subprocess_env(), "PREFECT_API_URL": url, "PREFECT_SERVER_API_HOST": "127.0.0.1",
           "PREFECT_SERVER_API_PORT": str(port)}
    server_pid = _read_pid("server.pid")
    if alive(server_pid, "prefect") and healthy(url):
        print(f"serve: Prefect server already running (pid {server_pid}) at {url}")
    else:
        if healthy(url):
            sys.exit(f"serve: another Prefect server (not this project's) answers on port {port}: stop it or use --port")
        prefect = Path(sys.executable).parent / "prefect"
        proc = _spawn([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)], "server", env)
        server_pid = proc.pid
        print(f"serve: starting the Prefect server (pid {server_pid}) at {url} ...")
        _wait(lambda: healthy(url), 120, "the Prefect server", proc, "server")
    _file("server.json").write_text(json.dumps({"url": url, "port": port, "pid": server_pid}) + "\n")
    _file("env.sh").write_text(
        f"# source me: the Prefect CLI then talks to this project's server\nexport PREFECT_HOME={prefect_state_dir()}\n"
        f"export PREFECT_API_URL={url}\nexport PREFECT_SERVER_ANALYTICS_ENABLED=false\nexport DO_NOT_TRACK=1\n")

    runner_pid = _read_pid("runner.pid")
    deployed = functools.partial(healthy, url, f"/deployments/name/{FLOW_NAME}/{name}", timeout=2)
    if alive(runner_pid, "pipeline.serve") and deployed():
        print(f"serve: deployment {FLOW_NAME}/{name} already served (pid {runner_pid})")
    else:
        proc = _spawn([sys.executable, "-m", "pipeline.serve", "_runner", "--name", name], "runner", env)
        print(f"serve: serving deployment {FLOW_NAME}/{name} (pid {proc.pid}) ...")
        _wait(deployed, 120, "the deployment runner", proc, "runner")
    print(f"serve: ready. UI: http://127.0.0.1:{port}  Run it with:\n"
          f"  source {_file('env.sh')}\n"
          f"  prefect deployment run '{FLOW_NAME}/{name}' --param epochs=12 --watch   "
          f"# parameters: epochs, overrides='{{\"cluster.k\": 50}}', fresh=true")


def _stop(name: str, marker: str) -> None:
    pid = _read_pid(f"{name}.pid")
    if not alive(pid, marker):
        print(f"serve: {name} not running")
        _file(f"{name}.pid").unlink(missing_ok=True)
        return
    # SIGINT first: Prefect's runner and server shut down cleanly on it (a worker ignores SIGTERM);
    # then SIGTERM and SIGKILL to the whole process group, which holds any flow run it started.
    for sig, wait in ((signal.SIGINT, 15), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + wait
        while alive(pid, marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not alive(pid, marker):
            break
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)  # anything left in the group (a flow run's children)
    _file(f"{name}.pid").unlink(missing_ok=True)
    print(f"serve: stopped {name} (pid {pid})")


def stop() -> None:
    # The runner first: a flow run it started is interrupted and resumes on the next run.
    _stop("runner", "pipeline.serve")
    _stop("server", "prefect")
    _file("server.json").unlink(missing_ok=True)


def status() -> int:
    server, runner = _read_pid("server.pid"), _read_pid("runner.pid")
    url = project_server_url()
    print(f"server: {'up at ' + url if url else 'down'}" + (f" (pid {server})" if alive(server, "prefect") else ""))
    print(f"runner: {'up (pid %d)' % runner if alive(runner, 'pipeline.serve') else 'down'}")
    print(f"state and logs: {prefect_state_dir()}")
    return 0 if url and alive(runner, "pipeline.serve") else 1


def _runner(name: str) -> None:
    """The background process: serve the flow until SIGINT/SIGTERM."""
    from prefect.types.entrypoint import EntrypointType

    from pipeline.flow import deepcluster

    # MODULE_PATH: each run imports pipeline.flow from the installed project, whatever the cwd.
    deepcluster.serve(name=name, entrypoint_type=EntrypointType.MODULE_PATH, pause_on_shutdown=False,
                      description="DeepCluster (Caron et al. 2018) on this project's params.yaml; "
                                  "parameters: epochs, overrides {'section.key': value}, fresh")


def main(argv: list[str] | None = None) -> None:
    offline_environment()  # the runner imports Prefect, and both services inherit this environment
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    st = sub.add_parser("start", help="start the Prefect server and serve the deployment (background)")
    st.add_argument("--port", type=int, default=int(os.environ.get("PREFECT_PORT", "4200")))
    st.add_argument("--name", default=DEFAULT_NAME, help="deployment name (runs: deepcluster/<name>)")
    sub.add_parser("stop", help="stop the runner and the server")
    sub.add_parser("status", help="are the server and the runner up?")
    sub.add_parser("env", help="print the shell exports for the Prefect CLI")
    rn = sub.add_parser("_runner", help=argparse.SUPPRESS)
    rn.add_argument("--name", default=DEFAULT_NAME)
    args = parser.parse_args(argv)
    if args.command == "start":
        start(args.port, args.name)
    elif args.command == "stop":
        stop()
    elif args.command == "status":
        sys.exit(status())
    elif args.command == "env":
        print(_file("env.sh").read_text() if _file("env.sh").exists() else "# not started: deepcluster serve start")
    else:
        _runner(args.name)


if __name__ == "__main__":
    main()
