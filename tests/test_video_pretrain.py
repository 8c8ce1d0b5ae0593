"""Pretraining of the video generator: deterministic for a seed, saved assets load back to the same policy."""

import json

import pytest
import torch

from otca.worlds.video.policy import ASSETS_DIR, WAN_CONFIG, WAN_WEIGHTS, load_video_networks, load_video_policy
from otca.worlds.video.pretrain import flow_matching_batch, pretrain, pretrain_video_generator


def test_flow_matching_batch_is_the_rectified_flow_interpolant():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, 8)
    x_t, t, target = flow_matching_batch(x0, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    t_ref = torch.sigmoid(torch.randn(3, generator=g))
    eps = torch.randn(x0.shape, generator=g)
    torch.testing.assert_close(t, t_ref, rtol=0, atol=0)
    torch.testing.assert_close(x_t, (1 - t_ref.view(3, 1, 1, 1, 1)) * x0 + t_ref.view(3, 1, 1, 1, 1) * eps)
    torch.testing.assert_close(target, eps - x0)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_pretrain_is_deterministic_and_learns(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a_net, a_text, a_rec = pretrain(steps=3, batch_size=4, log_every=0, seed=3)
        b_net, b_text, _ = pretrain(steps=3, batch_size=4, log_every=0, seed=3)
        c_net, _, _ = pretrain(steps=3, batch_size=4, log_every=0, seed=4)
    finally:
        torch.set_num_threads(threads)
    for x, y in ((_state(a_net), _state(b_net)), (_state(a_text), _state(b_text))):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert not all(torch.equal(v, _state(c_net)[k]) for k, v in _state(a_net).items())
    assert a_rec["steps"] == 3 and a_rec["seed"] == 3 and a_rec["final_loss"] > 0


def test_saved_assets_load_back_to_the_same_policy(tmp_path):
    record = pretrain_video_generator(tmp_path, steps=2, batch_size=2, log_every=0)
    saved = json.loads((tmp_path / WAN_CONFIG).read_text())
    assert saved["pretraining"]["steps"] == 2 == record["steps"]
    net, text = load_video_networks(tmp_path)
    policy = load_video_policy(tmp_path, guidance_scale=1.0)
    x = policy.init_latents(2, torch.Generator().manual_seed(0))
    prompts = ["a neat zero creeping left", "the digit 4 rushing down"]
    with torch.no_grad():
        v = policy.velocity(x, torch.tensor([0.5, 0.2]), policy.encode(prompts))
        direct = net(hidden_states=x, timestep=torch.tensor([500.0, 200.0]),
                     encoder_hidden_states=text(prompts)["prompt_embeds"], return_dict=False)[0]
    torch.testing.assert_close(v, direct, rtol=1e-5, atol=1e-6)
    (tmp_path / WAN_WEIGHTS).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="video_wan.safetensors is corrupt"):
        load_video_policy(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_video_policy(tmp_path / "nowhere")


@pytest.mark.slow
def test_shipped_weights_reproduce_from_pretrain(tmp_path):
    """The shipped generator is ``pretrain`` with its recorded settings, bit for bit (single-threaded)."""
    if not (ASSETS_DIR / WAN_CONFIG).is_file():
        pytest.skip("no shipped video generator yet (python -m otca.worlds.video.pretrain writes it)")
    rec = json.loads((ASSETS_DIR / WAN_CONFIG).read_text())["pretraining"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net, text, _ = pretrain(steps=rec["steps"], seed=rec["seed"], batch_size=rec["batch_size"], lr=rec["lr"],
                                warmup_steps=rec["warmup_steps"], ema_decay=rec["ema_decay"],
                                prompt_dropout=rec["prompt_dropout"], log_every=0)
    finally:
        torch.set_num_threads(threads)
    shipped_net, shipped_text = load_video_networks()
    for mine, theirs in ((net, shipped_net), (text, shipped_text)):
        a, b = _state(mine), _state(theirs)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
