"""FlowPolicy is an ``nn.Module`` with four abstract methods: an adapter that forgets one cannot be built, and an
object that only looks like a policy is not one."""

from __future__ import annotations

import pytest
import torch

from otca.models.base import FlowPolicy


class _Linear(FlowPolicy):
    """A complete toy policy: velocity ``W x`` over latents [B, 2]."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(2, 2, bias=False)
        self.frozen = torch.nn.Parameter(torch.ones(1), requires_grad=False)

    def encode(self, prompts):
        return len(prompts)

    def init_latents(self, n, generator):
        return torch.randn(n, 2, generator=generator)

    def velocity(self, x, sigma, cond):
        return self.w(x)

    def decode(self, x):
        return x.sigmoid()


def test_a_complete_policy_is_a_module_whose_trainables_are_those_with_grad():
    policy = _Linear()
    assert isinstance(policy, torch.nn.Module)
    assert [id(p) for p in policy.trainable_parameters()] == [id(policy.w.weight)]
    assert "w.weight" in policy.state_dict() and "frozen" in policy.state_dict()


def test_a_policy_missing_a_method_cannot_be_built():
    class NoVelocity(FlowPolicy):
        encode, init_latents, decode = _Linear.encode, _Linear.init_latents, _Linear.decode

    with pytest.raises(TypeError, match="velocity"):
        NoVelocity()


def test_a_look_alike_that_does_not_derive_is_not_a_policy():
    """The old runtime-checkable Protocol accepted any object with the right method names; the base class does not."""

    class LookAlike:
        encode, init_latents, velocity, decode = _Linear.encode, _Linear.init_latents, _Linear.velocity, _Linear.decode

        def trainable_parameters(self):
            return []

    assert not isinstance(LookAlike(), FlowPolicy)


def test_the_diffusers_adapters_are_flow_policies_once_velocity_and_decode_exist():
    from otca.models.diffusers_policy import DiffusersPolicy
    from otca.models.flux import FluxPolicy
    from otca.models.sd3 import SD3Policy
    from otca.models.wan import WanPolicy

    for cls in (FluxPolicy, SD3Policy, WanPolicy):
        assert issubclass(cls, DiffusersPolicy) and issubclass(cls, FlowPolicy)
    assert DiffusersPolicy.__abstractmethods__ == {"velocity", "decode"}
    assert FluxPolicy.__abstractmethods__ == frozenset()
