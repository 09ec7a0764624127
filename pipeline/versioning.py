"""DVC versioning of a DeepCluster run while it runs, whichever entry point started it.

The epoch loop is one DVC stage (`deepcluster`, outs data/epochs and models/checkpoints, `persist:
true`): DVC pipelines cannot loop, and one stage per epoch does not scale. Per epoch, the flow puts the
finished epoch's files into DVC's content-addressed cache (`cache_paths`: the build + transfer of `dvc
commit`, without writing dvc.lock, so a half-finished run never looks finished); at the end of the run
dvc.lock records it (`dvc repro` itself, or `commit_stage` + `repro` for the other entry points).
One DVC command may hold a workspace at a time, so every call takes the repo lock and waits a while
for another DVC command; `dvc repro` releases it while the stage command runs.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from stages.core.errors import StageError

STAGE = "deepcluster"  # the dvc.yaml stage that runs the epoch loop
LOCK_TIMEOUT_S = 120.0  # how long to wait for another DVC command to release the workspace


def under_dvc_stage() -> bool:
    """True when `dvc repro`/`dvc exp run` is running the deepcluster stage (DVC sets DVC_STAGE)."""
    return os.environ.get("DVC_STAGE", "").split(":")[-1] == STAGE


def subprocess_env() -> dict[str, str]:
    """dvc.yaml commands call `python -m ...`: put this interpreter's bin first on PATH for them."""
    env = {k: v for k, v in os.environ.items() if k != "DVC_STAGE"}  # a nested `dvc repro` is not the deepcluster stage
    return {**env, "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])}


class DvcWorkspace:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    @classmethod
    def find(cls, root: str | Path) -> "DvcWorkspace | None":
        root = Path(root)
        return cls(root) if (root / ".dvc").is_dir() and (root / "dvc.yaml").is_file() else None

    def _with_lock(self, what: str, fn: Callable):
        """Run fn(repo) holding the DVC workspace lock, waiting up to LOCK_TIMEOUT_S for it."""
        from dvc.lock import LockError
        from dvc.repo import Repo, lock_repo

        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            repo = Repo(str(self.root))
            repo.scm_context.quiet = True  # no "To track the changes with git" hints: callers say what to commit
            try:
                with lock_repo(repo):  # re-entrant: Repo.commit/Repo.add lock through it too
                    return fn(repo)
            except LockError as e:
                # DVC itself waits ~3 s before giving up; another DVC command may hold the lock longer.
                if time.monotonic() > deadline:
                    raise StageError(f"DVC: could not {what}: another DVC command has held {self.root}/.dvc/tmp/lock "
                                     f"for over {LOCK_TIMEOUT_S:.0f}s ({e}). Let it finish, then rerun: the run "
                                     "resumes and versions what it missed") from e
                time.sleep(2.0)
            finally:
                repo.close()

    def cache_paths(self, paths: list[str | Path]) -> None:
        """Put files/directories into DVC's cache without touching dvc.lock.

        The same build + transfer as `dvc commit` (dvc/output.py Output.commit), minus the lock-file
        update: objects are content-addressed and written atomically (temp file + rename), so a
        kill mid-way leaves at most an unreferenced temp file in the cache.
        """
        from dvc_data.hashfile.build import build
        from dvc_data.hashfile.transfer import transfer

        existing = [Path(p).resolve() for p in paths if Path(p).exists()]

        def work(repo) -> None:
            for path in existing:
                staging, _, obj = build(repo.cache.repo, str(path), repo.fs, "md5", ignore=repo.dvcignore)
                transfer(staging, repo.cache.repo, {obj.hash_info}, shallow=False, hardlink=False)

        if existing:
            self._with_lock("cache the epoch's artifacts", work)

    def commit_stage(self, stage: str = STAGE) -> None:
        """`dvc commit <stage> --force`: record the workspace's outputs, deps and params in dvc.lock."""
        self._with_lock(f"commit stage {stage!r}", lambda repo: repo.commit(stage, force=True))

    def add(self, path: str | Path) -> Path:
        """`dvc add <path>`: track a directory outside the pipeline (ablations); returns the .dvc file."""
        path = Path(path).resolve()
        self._with_lock(f"dvc add {path}", lambda repo: repo.add([str(path)]))
        return path.with_name(path.name + ".dvc")

    def repro(self, *targets: str, log: Callable[[str], None] = print) -> None:
        """`dvc repro [targets]` in a subprocess (it runs the stages' own commands), output to `log`."""
        beside = Path(sys.executable).parent / "dvc"  # this environment's: a served deployment may not have it on PATH
        cmd = [str(beside) if beside.exists() else "dvc", "repro", *targets]
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            output = []
            with subprocess.Popen(cmd, cwd=self.root, env=subprocess_env(), text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
                for line in proc.stdout:  # streamed, so a long final evaluation shows progress in the log
                    output.append(line)
                    if line.strip():
                        log(f"dvc: {line.rstrip()}")
            if proc.returncode == 0:
                return
            if "Unable to acquire lock" in "".join(output) and time.monotonic() < deadline:
                time.sleep(2.0)
                continue
            raise StageError(f"`{' '.join(cmd[1:])}` failed (exit {proc.returncode}); its output is in the log above. "
                             f"Fix the cause and run `dvc repro` in {self.root}")
