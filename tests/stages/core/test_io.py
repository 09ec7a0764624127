"""stages.core.io: atomic writes; a write refused for want of room keeps the old file."""
from __future__ import annotations

import json

import pytest

from stages.core.io import atomic_path, write_json


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "report.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half written")
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"v": 1}  # the old artifact survives
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # and no temp file is left

    with atomic_path(target) as tmp:
        assert tmp != target and tmp.parent == target.parent
        tmp.write_text('{"v": 2}')
    assert json.loads(target.read_text()) == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_write_refused_for_want_of_room_is_a_stage_error_and_keeps_the_old_file(tmp_path):
    """RLIMIT_FSIZE (in a subprocess) refuses the write half-way, as a full disk does (EFBIG instead of ENOSPC)."""
    import subprocess
    import sys

    target = tmp_path / "report.json"
    target.write_text('{"old": true}\n')
    code = ("import resource, sys\n"
            "from stages.core.errors import StageError\n"
            "from stages.core.io import write_json\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
            "try:\n"
            f"    write_json({str(target)!r}, {{'x': list(range(10000))}})\n"
            "except StageError as e:\n"
            "    sys.exit(str(e))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"could not write {target} (OSError: [Errno 27] File too large): ")
    assert "bytes free on its disk" in proc.stderr and "the run resumes at this stage" in proc.stderr
    assert target.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temp file left
