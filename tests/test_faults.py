"""Fault injection: ``otca train`` killed with SIGKILL (inside save_checkpoint between its files, mid-update,
mid-evaluation, at a random time) and resumed with ``otca train --resume`` ends bit-identical to the uninterrupted
run (``tests/_faults.py``: weights, EMA, optimizer state, every checkpoint's loop state, logs and summary).

Each run is its own process, forked from a warm server so that it does not pay ~30 s of start-up; one slow test
uses fresh ``python -m otca`` interpreters throughout. The default suite kills at a few points; ``-m slow`` kills at
every fault point of every iteration, twice in a row, and at several random times.
"""

from __future__ import annotations

import random

import pytest

from _faults import TrainServer, assert_same_run, fresh_train

ITERATIONS = 3
SHORT = [  # OTCA_FAULT_AT="<point>:<iteration>"
    "checkpoint-optimizer:2",  # inside save_checkpoint: weights and EMA written, the optimizer state not yet
    "update:1",  # after the first of the two optimizer steps of iteration 1
    "eval:2",  # the evaluation in the loop computed, not yet logged
]
EVERY_POINT = (
    ["before:0"]
    + [f"checkpoint-{f}:0" for f in ("state", "complete", "rename")]  # the state-only checkpoint after "before"
    + [f"checkpoint-{f}:{i}" for i in range(1, ITERATIONS + 1)
       for f in ("trainable", "ema", "optimizer", "state", "complete", "rename")]
    + [f"update:{i}" for i in range(ITERATIONS)]
    + [f"log:{i}" for i in range(ITERATIONS)]
    + ["eval:2", f"after:{ITERATIONS}", f"summary:{ITERATIONS}"]
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = TrainServer(tmp_path_factory.mktemp("server-logs"))
    yield s
    s.close()


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory):
    """The uninterrupted run, and its seconds."""
    ref = tmp_path_factory.mktemp("faults") / "ref"
    code, err, seconds = server.train(ref)
    assert code == 0, err
    return ref, seconds


def _kill_resume_compare(server, reference, run, fault: str) -> None:
    code, err, _ = server.train(run, fault=fault)
    assert code == -9, f"the fault point {fault} was never reached: {err[-2000:]}"
    code, err, _ = server.train(run, resume=True)
    assert code == 0, err[-2000:]
    assert_same_run(reference[0], run)


@pytest.mark.parametrize("fault", SHORT)
def test_killed_at_a_fault_point_resumes_exactly(server, reference, tmp_path, fault):
    _kill_resume_compare(server, reference, tmp_path / "run", fault)


def _killed_at_a_random_time(server, reference, run, seed: int) -> None:
    ref, seconds = reference
    server.train(run, kill_after=random.Random(seed).uniform(0.05, 1.0) * seconds)
    # killed before the run directory was made, there is nothing to resume: start again
    code, err, _ = server.train(run, resume=(run / "config.yaml").is_file())
    assert code == 0, err[-2000:]
    assert_same_run(ref, run)


def test_killed_at_a_random_time_resumes_exactly(server, reference, tmp_path):
    _killed_at_a_random_time(server, reference, tmp_path / "run", seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("fault", [f for f in EVERY_POINT if f not in SHORT])
def test_killed_at_every_fault_point_resumes_exactly(server, reference, tmp_path, fault):
    _kill_resume_compare(server, reference, tmp_path / "run", fault)


@pytest.mark.slow
@pytest.mark.parametrize("first,second", [("update:0", "checkpoint-trainable:2"), ("checkpoint-state:1", "eval:2"),
                                          ("before:0", "update:2"), ("checkpoint-complete:3", "summary:3")])
def test_killed_twice_resumes_exactly(server, reference, tmp_path, first, second):
    run = tmp_path / "run"
    assert server.train(run, fault=first)[0] == -9
    assert server.train(run, resume=True, fault=second)[0] == -9
    code, err, _ = server.train(run, resume=True)
    assert code == 0, err[-2000:]
    assert_same_run(reference[0], run)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 9))
def test_killed_at_random_times_resumes_exactly(server, reference, tmp_path, seed):
    _killed_at_a_random_time(server, reference, tmp_path / "run", seed)


@pytest.mark.slow
def test_fresh_interpreters_killed_in_a_checkpoint_write_resume_exactly(reference, tmp_path):
    """The same through ``python -m otca train`` in new interpreters (the console entry point, no fork server)."""
    run = tmp_path / "run"
    assert fresh_train(run, fault="checkpoint-ema:2").returncode == -9
    done = fresh_train(run, resume=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_run(reference[0], run)
