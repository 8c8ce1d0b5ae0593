"""Training options that change what an update does, each checked against a reference computed by hand:
EMA, several optimizer steps per iteration, several epochs over a rollout, shared initial noise, autocast.
Toy-sized runs of the embedded default through the public Trainer (CPU, a few seconds each)."""

from __future__ import annotations

import json

import pytest
import torch

from otca.config import ModelConfig, RunConfig, load_config
from otca.models.registry import build_policy
from otca.rollout import initial_noise
from otca.trainer import Trainer

torch.set_num_threads(1)

TINY = [
    "train.iterations=1",
    "train.prompts_per_iter=2",
    "train.group_size=2",
    "train.micro_batch=4",
    "train.lr=1e-3",  # large enough that one step moves every weight visibly
    "sampler.num_steps=4",
    "sampler.eval_steps=2",
    "eval.samples_per_prompt=1",
    "eval.metrics=null",
    "progress=false",
    "plots=false",
]


def tiny(tmp_path, *overrides: str) -> RunConfig:
    return load_config(None, [*TINY, f"out_dir={tmp_path}", *overrides])


def trainable(tr: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in tr.policy.named_parameters() if p.requires_grad}


def adam_steps(tr: Trainer) -> set[int]:
    """The step counts in AdamW's state, over all parameters (one value when every parameter was stepped)."""
    return {int(s["step"]) for s in tr.optimizer.state.values()}


def rows(tr: Trainer) -> list[dict]:
    return [json.loads(line) for line in (tr.run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ema_is_the_lerp_of_the_weights_before_and_after_the_update(tmp_path):
    decay = 0.9
    tr = Trainer(tiny(tmp_path, f"train.ema_decay={decay}"))
    before = trainable(tr)
    tr.train()
    after = trainable(tr)
    assert adam_steps(tr) == {1}
    assert tr.ema is not None and set(tr.ema) == set(before)
    moved = 0
    for n, p0 in before.items():
        p1 = after[n]
        want = p0.double() + (1 - decay) * (p1.double() - p0.double())  # ema <- ema + (1 - d) (p - ema), ema_0 = p0
        torch.testing.assert_close(tr.ema[n].double(), want, rtol=0, atol=1e-7)
        moved += int(not torch.equal(p1, p0))
    assert moved > 0.9 * len(before)
    # the EMA is not the live weights (a decay read the wrong way round, d <-> 1 - d, would be 0.9 of the way)
    gap = sum(float((tr.ema[n] - after[n]).abs().sum()) for n in after)
    step = sum(float((after[n] - before[n]).abs().sum()) for n in after)
    assert gap == pytest.approx(decay * step, rel=1e-3)


@pytest.mark.parametrize("updates, epochs, want", [(1, 1, 1), (2, 1, 2), (1, 2, 2), (2, 2, 4)])
def test_optimizer_steps_per_iteration_are_updates_times_epochs(tmp_path, updates, epochs, want):
    # micro-batches of 2: two optimizer steps need at least two rollout micro-batches (otca.batching.update_parts)
    tr = Trainer(tiny(tmp_path, f"train.updates_per_iter={updates}", f"train.inner_epochs={epochs}",
                      "train.micro_batch=2"))
    tr.train()
    assert adam_steps(tr) == {want}


def test_the_second_epoch_sees_a_ratio_other_than_one(tmp_path):
    one = Trainer(tiny(tmp_path / "one"))
    one.train()
    two = Trainer(tiny(tmp_path / "two", "train.inner_epochs=2"))
    two.train()
    r1, r2 = rows(one)[0], rows(two)[0]
    # one epoch, one step: every transition is re-evaluated under the sampling weights, ratio exactly 1
    assert r1["train/ratio_min"] == r1["train/ratio_max"] == 1.0
    # two epochs: the first step still sees 1, the second epoch runs on updated weights
    assert r2["train/ratio_first_step_max_dev"] == 0.0
    assert max(r2["train/ratio_max"] - 1, 1 - r2["train/ratio_min"]) > 1e-5


def test_same_noise_per_group_shares_the_initial_noise_within_a_group_only():
    policy = build_policy(ModelConfig(), torch.device("cpu"))
    groups, indices = [0, 0, 0, 1, 1, 1], [6, 7, 8, 9, 10, 11]
    shared = initial_noise(policy, 0, 3, indices, groups, same_per_group=True)  # [6, *latent]
    own = initial_noise(policy, 0, 3, indices, groups, same_per_group=False)
    assert shared.shape == own.shape == (6, *policy.init_latents(1, torch.Generator()).shape[1:])
    for i in range(6):
        for j in range(6):
            assert torch.equal(shared[i], shared[j]) == (groups[i] == groups[j]), (i, j)
            assert torch.equal(own[i], own[j]) == (i == j), (i, j)
    # a sample's noise depends on its global index (or group), not its position in this rank's batch
    torch.testing.assert_close(initial_noise(policy, 0, 3, indices[3:], groups[3:], False), own[3:], rtol=0, atol=0)
    # and on the iteration
    assert not torch.equal(initial_noise(policy, 0, 4, indices, groups, False), own)


def test_autocast_bfloat16_gives_a_close_but_not_identical_velocity(tmp_path):
    fp32 = Trainer(tiny(tmp_path / "fp32"))
    bf16 = Trainer(tiny(tmp_path / "bf16", "model.autocast=bfloat16"))
    prompts = ["a handwritten seven", "a handwritten two"]
    x = fp32.policy.init_latents(2, torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.9, 0.4])
    with torch.no_grad():
        v32 = fp32.model(x, sigma, fp32.policy.encode(prompts))
        v16 = bf16.model(x, sigma, bf16.policy.encode(prompts))
    assert v16.dtype == v32.dtype == torch.float32  # the velocity comes back in the latents' dtype
    assert not torch.equal(v16, v32)
    rel = float((v16 - v32).norm() / v32.norm())
    assert 1e-4 < rel < 0.05, rel  # bf16 has an 8-bit mantissa: errors of ~1%, not 0 and not garbage
