import pytest
import torch

from otca.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint


def test_roundtrip_and_latest_pointer(tmp_path):
    w = {"a": torch.randn(3, 2), "b.c": torch.randn(4)}
    p = torch.nn.Parameter(torch.randn(2))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(2)
    opt.step()
    save_checkpoint(tmp_path, 1, w, opt.state_dict(), {"x": 1})
    save_checkpoint(tmp_path, 2, {k: v + 1 for k, v in w.items()}, opt.state_dict(), {"x": 2}, ema=w)
    ck = load_checkpoint(latest_checkpoint(tmp_path))
    assert ck["state"] == {"iteration": 2, "x": 2}
    assert torch.equal(ck["weights"]["a"], w["a"] + 1) and torch.equal(ck["ema"]["b.c"], w["b.c"])
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    opt2.load_state_dict(ck["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        latest_checkpoint(tmp_path)
