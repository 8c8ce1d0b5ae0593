"""The GPU benchmark (``benchmarks/gpu.py``) at toy width on CPU: it runs end to end and its projection is the
line through the two measured depths (so the script stays ready for a GPU; its figures are not checked here)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)


def _load():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
    spec = importlib.util.spec_from_file_location("otca_gpu_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_toy_run_reports_every_phase_and_projects_linearly(tmp_path):
    gpu = _load()
    argv = ["--toy", "--models", "flux", "--modes", "lora", "--repeats", "1", "--json", str(tmp_path / "b.json")]
    out = gpu.run(argv)
    assert (tmp_path / "b.json").is_file() and out["device"] == "cpu"
    mode = out["models"]["flux"]["modes"]["lora"]
    for ck in ("no_ckpt", "ckpt"):
        row = mode[ck]
        for phases in (row["measured_phases_s"], row["projected_phases_s"]):
            assert set(phases) == {"rollout", "decode+rewards", "credit", "update", "iteration"}
            assert all(math.isfinite(v) for v in phases.values())
            parts = phases["rollout"] + phases["decode+rewards"] + phases["credit"] + phases["update"]
            assert math.isclose(phases["iteration"], parts, rel_tol=1e-9)
        assert 0 < row["measured_mfu"] < 1 and row["peak_gib"] is None
    assert mode["trainable_full_depth"] < mode["params_full_depth"]


def test_projection_helpers_by_hand():
    gpu = _load()
    assert gpu.line(2.0, 3.0, 1, 2, 19) == 20.0  # 1 s per unit over a 1 s rest
    s = gpu.Setting(steps=4, trained_steps=3, rollout_samples=5, train_samples=2, group=5, gpus=1, note="")
    call = {"rollout_call_s": 1.0, "update_call_s": 2.0, "optimizer_step_s": 0.5}
    p = gpu.phases(call, {"decode_sample_s": 0.1, "credit_s": 0.25}, s, mb=2)
    # rollout 4 steps x ceil(5/2)=3 calls; update 3 steps x 1 call + the optimizer; decode 5 x 0.1
    assert p == {"rollout": 12.0, "decode+rewards": 0.5, "credit": 0.25, "update": 6.5, "iteration": 19.25}
