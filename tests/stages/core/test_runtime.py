"""stages.core.runtime: per-epoch seeds, seeded subsets and the stages' progress lines."""
from __future__ import annotations

import os
import select
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stages.core.runtime import Phases, clock, seed_for, seeded_subset
from tests.conftest import phases_printed

REPO = Path(__file__).resolve().parents[3]


def test_seed_for_differs_across_epochs_and_streams_and_is_reproducible():
    seeds = [seed_for(0, epoch, "cluster") for epoch in range(1, 51)]
    assert len(set(seeds)) == 50  # k-means must start from different centroids every epoch
    assert seeds == [seed_for(0, epoch, "cluster") for epoch in range(1, 51)]
    assert seed_for(0, 3, "cluster") != seed_for(0, 3, "train")
    assert seed_for(0, 3, "cluster") != seed_for(1, 3, "cluster")
    assert all(0 <= s < 2**31 for s in seeds)  # faiss and torch take 31-bit seeds


def test_seeded_subset_is_seeded_sorted_and_complete_without_a_limit():
    a = seeded_subset(1000, 50, seed=3)
    assert len(a) == 50 and len(set(a)) == 50 and list(a) == sorted(a) and a.max() < 1000
    np.testing.assert_array_equal(a, seeded_subset(1000, 50, seed=3))
    assert not np.array_equal(a, seeded_subset(1000, 50, seed=4))
    np.testing.assert_array_equal(seeded_subset(7, None, 0), np.arange(7))
    np.testing.assert_array_equal(seeded_subset(7, 100, 0), np.arange(7))


def test_clock_is_short_at_every_scale():
    assert [clock(s) for s in (0.04, 41.23, 62.4, 3599.6, 7500)] == ["0.0s", "41.2s", "1m 02s", "1h 00m", "2h 05m"]


def test_phases_are_numbered_and_timed_and_a_failed_phase_is_not_closed(capsys):
    phases = Phases("demo", total=2)
    with phases.phase("first"):
        pass
    with phases.phase("second") as phase:
        phase.note = "12 things"
    assert phase.seconds >= 0
    assert phases_printed(capsys.readouterr().out, "demo") == [("first", ""), ("second", "12 things")]
    with pytest.raises(ValueError), Phases("demo", total=1).phase("failing"):
        raise ValueError
    assert capsys.readouterr().out == "demo: [1/1] failing ...\n"  # no "done" line


def test_a_phase_line_reaches_a_pipe_while_the_phase_runs():
    """Under DVC or a subprocess capture stdout is a pipe, which Python block-buffers unless flushed."""
    code = "import sys\nfrom stages.core.runtime import Phases\nwith Phases('demo', 1).phase('waiting'): sys.stdin.readline()"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # as DVC runs it, whatever this shell says
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert select.select([child.stdout], [], [], 60)[0], "no line while the phase runs"
        assert child.stdout.readline() == "demo: [1/1] waiting ...\n"
    finally:
        child.communicate("go\n", timeout=60)


def test_progress_speaks_every_tenth_with_the_time_left_and_names_few_long_items(capsys):
    phases = Phases("demo", total=1)
    assert list(phases.progress(range(1000), 1000, "headers")) == list(range(1000))
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"demo:   headers {n:,}/1,000" for n in range(100, 1001, 100)]
    assert all("/s, about " in line and line.endswith(" left") for line in lines[:-1])
    assert lines[-1].startswith("demo:   headers 1,000/1,000 (100%), ") and "left" not in lines[-1]

    assert list(phases.progress(["conv1", "fc"], 2, "probe", name=str)) == ["conv1", "fc"]
    first, last = capsys.readouterr().out.splitlines()
    assert first.startswith("demo:   probe 1/2 conv1 in ") and first.endswith(" left")
    assert last.startswith("demo:   probe 2/2 fc in ") and "left" not in last
