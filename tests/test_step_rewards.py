"""otca.step_rewards: the clean prediction of every state and its scores, on a toy velocity and reward."""

import pytest
import torch

from otca.flow.schedule import make_sigmas
from otca.step_rewards import clean_predictions, score_states


def test_clean_predictions_by_hand():
    sigmas = make_sigmas(4)  # 1 .. 0
    latents = torch.randn(3, 5, 2, 2, generator=torch.Generator().manual_seed(0))
    calls = []

    def velocity(x, sigma):
        calls.append(float(sigma[0]))
        return 2 * x  # x0_hat = x - sigma * 2x = (1 - 2 sigma) x

    views = clean_predictions(velocity, latents, sigmas)
    want = torch.stack([(1 - 2 * float(s)) * latents[:, t] for t, s in enumerate(sigmas)], 1)
    torch.testing.assert_close(views, want)
    assert calls == [float(s) for s in sigmas[:-1]]  # no call at sigma = 0: the state is its own prediction
    with pytest.raises(ValueError, match="latents, sigmas: expected"):
        clean_predictions(velocity, latents[:, :4], sigmas)


def test_score_states_uses_known_rows():
    views = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)  # [b=2, S=3, latent 2]
    seen = []

    def score(latents, prompts):
        seen.append(latents.clone())
        return torch.stack([latents.sum(1), latents.max(1).values], 1)  # [b, K=2]

    known = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    out = score_states(views, ["a", "b"], score, known={1: known})
    assert out.shape == (2, 3, 2) and len(seen) == 2
    torch.testing.assert_close(out[:, 1], known)
    torch.testing.assert_close(out[:, 0], torch.tensor([[1.0, 1.0], [13.0, 7.0]]))
    torch.testing.assert_close(out[:, 2], torch.tensor([[9.0, 5.0], [21.0, 11.0]]))
    with pytest.raises(ValueError, match="prompts: expected 2"):
        score_states(views, ["a"], score)
