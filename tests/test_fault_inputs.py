"""Faults that are not kills: a reward that fails mid-run, bad input at resume time and a disk that fills while a
checkpoint is written. Each fails with one line (``otca`` exits 2), loses nothing already written, and the run
directory resumes to the uninterrupted run's result."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from _faults import assert_same_run
from otca.checkpoint import latest_checkpoint
from otca.cli import main
from otca.rewards.options import WeightFreeOptions
from otca.rewards.registry import register_reward

RUN = [
    "train.iterations=3",
    "train.prompts_per_iter=2",
    "train.group_size=2",
    "train.micro_batch=2",
    "sampler.num_steps=2",
    "sampler.eval_steps=2",
    "eval.samples_per_prompt=1",
    "eval.metrics=null",
    "prompts.eval=digits:eval",
    "checkpoint_every=1",
    "plots=false",
    "progress=false",
    "rewards=[{name: test-flaky}]",
]
TRAIN_BATCH = 4  # prompts_per_iter x group_size: the flaky reward fails only on training batches

FLAKY: dict = {"mode": None, "at": 1, "calls": 0}  # fail on training call number FLAKY["at"] (0-based)


@register_reward("test-flaky", WeightFreeOptions)
class _FlakyReward:
    """Mean brightness; on its ``at``-th training batch it raises, returns NaN or inf, or the wrong shape."""

    name = "test-flaky"
    names = (name,)

    def __init__(self, options):
        pass

    def __call__(self, pixels, prompts):
        s = pixels.float().mean(dim=tuple(range(1, pixels.dim())))  # [B]
        if pixels.shape[0] != TRAIN_BATCH:
            return s
        FLAKY["calls"] += 1
        if FLAKY["calls"] - 1 != FLAKY["at"] or FLAKY["mode"] is None:
            return s
        mode = FLAKY["mode"]
        if mode == "raise":
            raise RuntimeError("the scoring service is down")
        if mode in ("nan", "inf"):
            s[1] = float(mode)
            return s
        if mode == "shape":
            return s[:, None].repeat(1, 2)  # [B, 2] for one column
        if mode == "batch":
            return s[1:]  # [B - 1]
        raise AssertionError(mode)


@pytest.fixture(autouse=True)
def _reset_flaky():
    FLAKY.update(mode=None, at=1, calls=0)
    yield
    FLAKY.update(mode=None, at=1, calls=0)


def _train(capsys, *args: str) -> tuple[int, list[str]]:
    code = main(["train", *args])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ref = tmp_path_factory.mktemp("inputs") / "ref"
    FLAKY.update(mode=None, calls=0)
    assert main(["train", *RUN, f"out_dir={ref}"]) == 0
    return ref


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("mode,message", [
    ("raise", "reward 'test-flaky' failed: RuntimeError: the scoring service is down"),
    ("nan", "reward 'test-flaky' returned 1 non-finite score(s) of 4 (first at sample 1, column 'test-flaky')"),
    ("inf", "reward 'test-flaky' returned 1 non-finite score(s) of 4 (first at sample 1, column 'test-flaky')"),
    ("shape", "reward 'test-flaky' returned shape (4, 2), expected (4,) (columns test-flaky)"),
    ("batch", "reward 'test-flaky' returned shape (3,), expected (4,) (columns test-flaky)"),
])
def test_a_failing_reward_fails_the_step_in_one_line_and_loses_nothing(tmp_path, capsys, mode, message):
    run = tmp_path / "run"
    FLAKY.update(mode=mode, at=1)  # iteration 1's scoring fails
    code, err = _train(capsys, *RUN, f"out_dir={run}")
    assert (code, err) == (2, [f"otca: error: {message}"])
    # nothing already written is lost: iteration 0's row and its checkpoint are there
    assert [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0]
    assert latest_checkpoint(run).name == "iter-000001"


def test_a_run_stopped_by_a_failing_reward_resumes_exactly(reference, tmp_path, capsys):
    run = tmp_path / "run"
    FLAKY.update(mode="nan", at=1)
    assert _train(capsys, *RUN, f"out_dir={run}")[0] == 2
    FLAKY.update(mode=None)
    assert _train(capsys, "--resume", str(run))[0] == 0
    assert_same_run(reference, run)


BAD_INPUT = [
    ("train.bogus=1", "unknown config key 'train.bogus'"),
    ("train.lr=fast", "train.lr"),
    ("prompts.train={empty}", "prompt file '{empty}' has no prompts"),
    ("prompts.train={binary}", "prompt file '{binary}' is unreadable"),
    ("prompts.train={missing}", "prompt file '{missing}' not found"),
    ("model.path={missing}", "{missing}"),
]


def test_bad_input_at_resume_is_one_line_and_leaves_the_run_resumable(reference, tmp_path, capsys):
    files = {"empty": tmp_path / "empty.txt", "binary": tmp_path / "binary.txt", "missing": tmp_path / "nope"}
    files["empty"].write_text("\n  \n")
    files["binary"].write_bytes(b"\xff\xfe\x00seven\n")
    run = tmp_path / "run"
    FLAKY.update(mode="raise", at=1)  # an interrupted run to resume
    assert _train(capsys, *RUN, f"out_dir={run}")[0] == 2
    FLAKY.update(mode=None)
    before = _snapshot(run)
    for override, message in BAD_INPUT:
        code, err = _train(capsys, "--resume", str(run), override.format(**files))
        assert code == 2 and len(err) == 1 and err[0].startswith("otca: error: "), (override, err)
        assert message.format(**files) in err[0], (override, err)
        assert _snapshot(run) == before, override  # nothing touched
    assert _train(capsys, "--resume", str(run))[0] == 0
    assert_same_run(reference, run)


def test_a_disk_that_fills_during_a_checkpoint_keeps_the_previous_one(reference, tmp_path, capsys, monkeypatch):
    import otca.checkpoint as ck

    real = ck.torch.save
    def full_disk(obj, path, *a, **k):  # the optimizer state of the second checkpoint: half written, then ENOSPC
        if "iter-000002" in str(path):
            Path(path).write_bytes(b"\x00" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path, *a, **k)

    run = tmp_path / "run"
    monkeypatch.setattr(ck.torch, "save", full_disk)
    code, err = _train(capsys, *RUN, f"out_dir={run}")
    ckpts = run / "checkpoints"
    assert code == 2 and err == [f"otca: error: checkpoint '{ckpts / 'iter-000002'}': could not write it "
                                 f"(No space left on device); the previous checkpoint is still usable"]
    assert sorted(p.name for p in ckpts.iterdir()) == ["iter-000000", "iter-000001", "latest"]
    assert latest_checkpoint(run).name == "iter-000001"
    monkeypatch.setattr(ck.torch, "save", real)
    assert _train(capsys, "--resume", str(run))[0] == 0
    assert_same_run(reference, run)


def test_a_damaged_checkpoint_is_skipped_with_a_line_or_named_when_none_is_left(reference, tmp_path, capsys):
    run = tmp_path / "run"
    FLAKY.update(mode="raise", at=2)  # checkpoints after iterations 0, 1 and 2; iteration 2 fails
    assert _train(capsys, *RUN, f"out_dir={run}")[0] == 2
    FLAKY.update(mode=None)
    ckpts = run / "checkpoints"
    weights = ckpts / "iter-000002" / "trainable.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:-7])  # truncated
    code, err = _train(capsys, "--resume", str(run))
    assert code == 0
    assert err == [f"otca: skipping checkpoint '{ckpts / 'iter-000002'}': file 'trainable.safetensors' has "
                   f"{size - 7} bytes, {size} were written (truncated)"]
    assert_same_run(reference, run)
    # every checkpoint damaged: one line naming the newest
    for p in ckpts.glob("iter-*/state.json"):
        data = bytearray(p.read_bytes())
        data[3] ^= 1
        p.write_bytes(bytes(data))
    code, err = _train(capsys, "--resume", str(run))
    assert code == 2 and err[-1] == (
        f"otca: error: no usable checkpoint in '{ckpts}'; the newest: checkpoint '{ckpts / 'iter-000003'}': "
        f"file 'state.json' does not match its CRC-32 (corrupt)")


def test_resume_keeps_the_evaluation_before_training(reference, tmp_path, capsys):
    """The "before" of a resumed run is the one evaluated before training, not one of the trained weights."""
    run = tmp_path / "run"
    FLAKY.update(mode="raise", at=2)
    assert _train(capsys, *RUN, f"out_dir={run}")[0] == 2
    before = json.loads((run / "checkpoints" / "iter-000002" / "state.json").read_text())["eval_before"]
    FLAKY.update(mode=None)
    assert _train(capsys, "--resume", str(run))[0] == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_before"] == before == json.loads((reference / "summary.json").read_text())["eval_before"]
    assert summary["eval_before"] != summary["eval_after"]
    assert torch.isfinite(torch.tensor(list(before.values()))).all()
