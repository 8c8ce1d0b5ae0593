"""Checks shared by the generator-adapter tests (FLUX, SD3, Wan): each holds for every FlowPolicy the same way,
so each is written once here and run on each adapter's tiny twin.

Every check compares against an independent reference: a direct transformer call, a second policy built
another way, a re-evaluated log-density, gradients with checkpointing off.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from otca.config import LoraConfig

CPU = torch.device("cpu")


def latents(policy, n: int = 3, seed: int = 0) -> torch.Tensor:
    """``policy``'s initial noise ``[n, *latent]`` from one seeded generator."""
    return policy.init_latents(n, torch.Generator().manual_seed(seed))


def check_timestep_is_1000_sigma(policy, prompts: list[str], sigmas: torch.Tensor, **cond_fields: str) -> None:
    """The transformer sees the scheduler timestep ``1000 * sigma`` (FlowMatchEulerDiscreteScheduler): the
    velocity equals a direct call with it, exactly, and differs from one with ``sigma`` (the check can fail).
    ``cond_fields`` maps further transformer keywords to cond fields (SD3: ``pooled_projections="pooled"``)."""
    x, cond = latents(policy), policy.encode(prompts)

    def direct(t):
        extra = {k: getattr(cond, f) for k, f in cond_fields.items()}
        return policy.transformer(
            hidden_states=x, timestep=t, encoder_hidden_states=cond.prompt_embeds, return_dict=False, **extra
        )[0]

    with torch.no_grad():
        v = policy.velocity(x, sigmas, cond)
        torch.testing.assert_close(v, direct(sigmas * 1000), rtol=0, atol=0)
        assert not torch.allclose(v, direct(sigmas), atol=1e-3)


def check_same_policy(a, b, prompts: list[str], sigmas: torch.Tensor) -> None:
    """Policies ``a`` and ``b`` are the same function: equal conditioning fields, velocity and decoding."""
    ca, cb = a.encode(prompts), b.encode(prompts)
    for f, t in ca.positive().items():
        assert torch.equal(t, getattr(cb, f)), f
    x = latents(b)
    with torch.no_grad():
        torch.testing.assert_close(a.velocity(x, sigmas, ca), b.velocity(x, sigmas, cb), rtol=0, atol=0)
        torch.testing.assert_close(a.decode(x), b.decode(x), rtol=0, atol=0)


def check_full_and_lora_trainables(build: Callable[..., torch.nn.Module], prompts: list[str], sigmas: torch.Tensor):
    """``build(lora=...)``: without LoRA every transformer parameter trains (and only those); with LoRA only its
    adapter weights, and the policy is unchanged (LoRA B starts at zero)."""
    full = build()
    expect = {"transformer." + n for n, _ in full.transformer.named_parameters()}
    assert {n for n, p in full.named_parameters() if p.requires_grad} == expect
    assert {id(p) for p in full.trainable_parameters()} == {id(p) for n, p in full.named_parameters() if n in expect}
    lora = build(lora=LoraConfig(rank=2))
    names = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("transformer.") and ".lora_" in n for n in names)
    assert len(lora.trainable_parameters()) == len(names)
    x = latents(full)
    with torch.no_grad():
        torch.testing.assert_close(
            lora.velocity(x, sigmas, lora.encode(prompts)), full.velocity(x, sigmas, full.encode(prompts))
        )


def check_checkpointing_keeps_gradients(
    build: Callable[..., torch.nn.Module], prompts: list[str], sigmas: torch.Tensor
) -> None:
    """``build(gradient_checkpointing=...)``: the flag reaches the transformer, and the gradients of a loss on
    the velocity are the same with it as without."""
    grads = []
    for checkpointing in (False, True):
        policy = build(gradient_checkpointing=checkpointing)
        assert policy.transformer.is_gradient_checkpointing == checkpointing
        policy.velocity(latents(policy), sigmas, policy.encode(prompts)).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.trainable_parameters()]))
    torch.testing.assert_close(grads[1], grads[0])


def check_resampled_ratio_is_one(policy, prompts: list[str], step: Callable, eta: float) -> None:
    """A transition ``step`` sampled without grad, then re-evaluated with grad as training does, has ratio
    exactly 1, and the ratio's gradient reaches the trainable parameters (left zeroed afterwards)."""
    x, cond = latents(policy), policy.encode(prompts)
    sigma, sigma_next = 0.8, 0.6
    s = torch.full((len(x),), sigma)
    with torch.no_grad():
        v = policy.velocity(x, s, cond)
        x_next, logp_old, _, _ = step(x, v, sigma, sigma_next, eta=eta, generator=torch.Generator().manual_seed(3))
    v_new = policy.velocity(x, s, cond)  # the training-time re-evaluation, with grad
    _, logp_new, _, _ = step(x, v_new, sigma, sigma_next, eta=eta, prev=x_next)
    ratio = torch.exp(logp_new - logp_old)
    assert torch.equal(ratio.detach(), torch.ones(len(x)))
    ratio.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.trainable_parameters())
    policy.zero_grad(set_to_none=True)


def check_flow_policy_contract(policy, prompts: list[str], sigmas: torch.Tensor) -> None:
    """What the FlowPolicy protocol promises, by behaviour (a runtime ``isinstance`` only sees method names):
    one generator per sample, a velocity per sample (a batch row equals the sample alone; sigma and prompt
    matter), deterministic decoding that depends on the latent, and trainable parameters the velocity depends
    on. ``prompts``: distinct, one per sample; ``sigmas [len(prompts)]``."""
    n = len(prompts)
    x = policy.init_latents(n, [torch.Generator().manual_seed(100 + i) for i in range(n)])  # [n, *latent]
    alone = policy.init_latents(1, [torch.Generator().manual_seed(100 + n - 1)])
    assert torch.equal(alone[0], x[-1]) and not torch.equal(x[0], x[1])
    cond = policy.encode(prompts)
    with torch.no_grad():
        v = policy.velocity(x, sigmas, cond)
        assert v.shape == x.shape and torch.isfinite(v).all()
        torch.testing.assert_close(policy.velocity(x[-1:], sigmas[-1:], cond[-1:]), v[-1:], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(policy.velocity(x, sigmas * 0.5, cond), v, atol=1e-4)
        assert not torch.allclose(policy.velocity(x, sigmas, policy.encode(prompts[::-1])), v, atol=1e-4)
        pixels = policy.decode(x)
        assert pixels.shape[0] == n and torch.equal(policy.decode(x), pixels) and not torch.equal(pixels[0], pixels[1])
    params = list(policy.trainable_parameters())
    assert params and all(p.requires_grad for p in params)
    policy.velocity(x, sigmas, cond).square().mean().backward()
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params)
    for p in params:
        p.grad = None
