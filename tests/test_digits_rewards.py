"""The digits world's recognisers (shipped weights, training, loading) and its training rewards."""

import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from otca.rewards import RewardSet
from otca.rewards.registry import build_reward, reward_names
from otca.worlds.digits import judges
from otca.worlds.digits.data import load_digit_images
from otca.worlds.digits.prompts import TRAIN_TEMPLATES, UnknownPromptError, make_prompt
from otca.worlds.digits.rewards import (
    CENTRE_SIGMA,
    SPECKLE_SCALE,
    centring,
    crispness,
    ink_balance,
    median3,
    smoothness,
    stroke_quality,
)

DIGIT_REWARDS = ("digit-alignment", "stroke-quality", "jpeg-compressibility")


@pytest.fixture(scope="module")
def test_split():
    return load_digit_images("test")  # [360, 1, 16, 16], [360]


def prompts_for(labels, shift=0):
    return [make_prompt(TRAIN_TEMPLATES[i % len(TRAIN_TEMPLATES)], (int(d) + shift) % 10) for i, d in enumerate(labels)]


def gaussian_blur(x, sigma):
    t = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    return F.conv2d(F.pad(x, (3, 3, 3, 3), mode="replicate"), (k[:, None] * k[None, :])[None, None])


# --- the recognisers ---------------------------------------------------------------------------------


def test_shipped_recognisers_are_accurate_on_the_test_split(test_split):
    x, y = test_split
    assert judges.accuracy(judges.load_classifier(), x, y) >= 0.95
    assert judges.accuracy(judges.load_judge(), x, y) >= 0.90


def test_classifier_and_judge_differ_in_architecture():
    assert isinstance(judges.load_classifier(), judges.DigitCNN)
    assert isinstance(judges.load_judge(), judges.DigitMLP)
    assert judges.CLASSIFIER_RECIPE != judges.JUDGE_RECIPE


def test_train_judges_is_deterministic_and_loadable(tmp_path):
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    acc_a = judges.train_judges(tmp_path / "a", seed=3, epochs=1)
    acc_b = judges.train_judges(tmp_path / "b", seed=3, epochs=1)
    assert torch.equal(torch.get_rng_state(), state) and torch.get_num_threads() == threads
    assert acc_a == acc_b and set(acc_a) == {judges.CLASSIFIER, judges.JUDGE}
    for name in (judges.CLASSIFIER, judges.JUDGE):
        a = (tmp_path / "a" / f"{name}.safetensors").read_bytes()
        assert a == (tmp_path / "b" / f"{name}.safetensors").read_bytes()
    clf = judges.load_classifier(tmp_path / "a")
    x, y = load_digit_images("test")
    assert judges.accuracy(clf, x, y) == pytest.approx(acc_a[judges.CLASSIFIER])
    assert judges.accuracy(clf, x, y) > 0.5  # one epoch already learns most of it
    reward = build_reward("digit-alignment", assets_dir=str(tmp_path / "a"))
    assert reward.model is clf and reward.model is not judges.load_classifier()


def test_missing_asset_names_the_file(tmp_path):
    shutil.copy(judges.ASSETS_DIR / f"{judges.CLASSIFIER}.json", tmp_path)
    with pytest.raises(judges.JudgeAssetError, match=f"{judges.CLASSIFIER}.safetensors: missing"):
        judges.load_classifier(tmp_path)


def test_corrupt_asset_names_the_file(tmp_path):
    for suffix in (".json", ".safetensors"):
        shutil.copy(judges.ASSETS_DIR / f"{judges.JUDGE}{suffix}", tmp_path)
    (tmp_path / f"{judges.JUDGE}.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(judges.JudgeAssetError, match=f"{judges.JUDGE}.safetensors: unreadable"):
        judges.load_judge(tmp_path)
    (tmp_path / f"{judges.JUDGE}.json").write_text("{")
    with pytest.raises(judges.JudgeAssetError, match=f"{judges.JUDGE}.json: not a valid"):
        judges.load_judge(tmp_path)


def test_augment_keeps_shape_and_range():
    x = load_digit_images("train")[0][:16]
    torch.manual_seed(0)
    for recipe in (judges.CLASSIFIER_RECIPE, judges.JUDGE_RECIPE):
        out = judges.augment(x, recipe)
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1 and not torch.equal(out, x)


# --- digit-alignment -----------------------------------------------------------------------------------


def test_alignment_high_for_the_prompted_digit_low_for_another(test_split):
    x, y = test_split
    r = build_reward("digit-alignment")
    right, wrong = r(x, prompts_for(y)), r(x, prompts_for(y, shift=1))
    assert right.mean() > 0.95 and wrong.mean() < 0.02
    assert (right > wrong).float().mean() > 0.98


def test_alignment_equals_the_classifier_softmax(test_split):
    x, y = test_split
    with torch.no_grad():
        expected = judges.load_classifier()(x[:5]).softmax(-1)[torch.arange(5), y[:5]]  # [5]
    assert torch.allclose(build_reward("digit-alignment")(x[:5], prompts_for(y[:5])), expected)


def test_alignment_unknown_prompt_fails_loudly():
    r = build_reward("digit-alignment")
    with pytest.raises(UnknownPromptError, match="a cat"):
        r(torch.zeros(2, 1, 16, 16), ["digit 3", "a cat"])
    with pytest.raises(ValueError, match="1 prompts for 2 images"):
        r(torch.zeros(2, 1, 16, 16), ["digit 3"])


# --- stroke-quality: its terms on hand-computed images -------------------------------------------------


def test_crispness_hand_values():
    assert crispness(torch.zeros(1, 1, 4, 4)).item() == 1.0
    assert crispness((torch.rand(1, 1, 4, 4) > 0.5).float()).item() == 1.0
    assert crispness(torch.full((1, 1, 4, 4), 0.5)).item() == 0.0
    assert crispness(torch.full((1, 1, 4, 4), 0.25)).item() == pytest.approx((1 - 0.75) ** 2)


def test_median3_matches_a_loop():
    x = torch.rand(2, 1, 5, 6, generator=torch.Generator().manual_seed(0))
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    ref = torch.empty_like(x)
    for b in range(2):
        for i in range(5):
            for j in range(6):
                ref[b, 0, i, j] = padded[b, 0, i : i + 3, j : j + 3].flatten().sort().values[4]
    assert torch.equal(median3(x), ref)


def test_smoothness_hand_values():
    assert smoothness(torch.full((1, 1, 8, 8), 0.3)).item() == 1.0
    dot = torch.zeros(1, 1, 8, 8)
    dot[0, 0, 3, 4] = 1.0  # an isolated pixel: the median removes all of it, speckle = 1 / 1
    assert smoothness(dot).item() == pytest.approx(math.exp(-1 / SPECKLE_SCALE), rel=1e-4)
    block = torch.zeros(1, 1, 8, 8)
    block[0, 0, 2:6, 2:6] = 1.0  # a 4x4 square: the median only trims its 4 corners
    assert smoothness(block).item() == pytest.approx(math.exp(-4 / 16 / SPECKLE_SCALE), rel=1e-4)


@pytest.mark.parametrize("ink, expected", [(0.0, 0.0), (0.075, 0.5), (0.15, 1.0), (0.3, 1.0), (0.45, 1.0),
                                           (0.525, 0.5), (0.6, 0.0), (1.0, 0.0)])
def test_ink_balance_hand_values(ink, expected):
    assert ink_balance(torch.full((1, 1, 4, 4), ink)).item() == pytest.approx(expected, abs=1e-6)


def test_centring_hand_values():
    img = torch.zeros(3, 1, 16, 16)
    img[0, 0, 7:9, 7:9] = 1.0  # centred
    img[1, 0, 7, 7] = 1.0  # centroid (7, 7), the centre is (7.5, 7.5): d^2 = 0.5
    img[2, 0, 7:9, 11:13] = 1.0  # 4 px right of the centre
    expected = torch.tensor([1.0, math.exp(-0.5 / (2 * CENTRE_SIGMA**2)), math.exp(-16 / (2 * CENTRE_SIGMA**2))])
    assert torch.allclose(centring(img), expected, atol=1e-4)
    assert centring(torch.zeros(1, 1, 16, 16)).item() == pytest.approx(1.0)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.0, 1.0))
def test_stroke_quality_is_the_product_of_its_terms_in_unit_range(seed, scale):
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(seed)) * scale
    s = stroke_quality(x)
    assert torch.allclose(s, crispness(x) * smoothness(x) * ink_balance(x) * centring(x))
    assert ((s >= 0) & (s <= 1)).all()


# --- stroke-quality: the orderings the lead relies on --------------------------------------------------


def test_stroke_quality_real_beats_blurred_beats_noise(test_split):
    x, _ = test_split
    r = build_reward("stroke-quality")
    real, blurred = r(x, [""] * len(x)), r(gaussian_blur(x, 1.0), [""] * len(x))
    noise = r(torch.rand(64, 1, 16, 16, generator=torch.Generator().manual_seed(0)), [""] * 64)
    assert real.mean() > 1.2 * blurred.mean()
    assert (real > blurred).float().mean() > 0.8  # per image, not only on average
    assert blurred.mean() > 100 * noise.mean()


def test_stroke_quality_empty_and_full_score_zero_and_a_clean_blob_is_its_loophole(test_split):
    x, _ = test_split
    r = build_reward("stroke-quality")
    assert r(torch.zeros(2, 1, 16, 16), ["", ""]).tolist() == [0.0, 0.0]
    assert r(torch.ones(2, 1, 16, 16), ["", ""]).tolist() == [0.0, 0.0]
    rows, cols = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    disk = (((rows - 7.5) ** 2 + (cols - 7.5) ** 2) <= 16).float()[None, None]  # r = 4 px, ink 0.2
    assert r(disk, [""]).item() == pytest.approx(1.0, abs=1e-4)
    assert r(disk, [""]).item() > r(x, [""] * len(x)).max().item()


# --- all rewards together ------------------------------------------------------------------------------


def test_every_digit_reward_is_registered():
    assert set(DIGIT_REWARDS) <= set(reward_names())


@pytest.mark.parametrize("name", DIGIT_REWARDS)
def test_rewards_return_finite_cpu_float32_and_are_deterministic(name):
    r = build_reward(name)
    assert r.name == name
    x = torch.rand(5, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x.requires_grad_(True)
    prompts = prompts_for(range(5))
    s = r(x, prompts)
    assert s.shape == (5,) and s.dtype == torch.float32 and s.device.type == "cpu"
    assert torch.isfinite(s).all() and torch.equal(s, r(x, prompts))


@pytest.mark.parametrize("name", ["digit-alignment", "stroke-quality"])
def test_digit_rewards_reject_other_shapes(name):
    with pytest.raises(ValueError, match=f"{name}: pixels must be \\[B, 1, 16, 16\\]"):
        build_reward(name)(torch.zeros(2, 3, 16, 16), ["digit 1", "digit 2"])


def test_reward_set_over_the_three_gives_b_by_3(test_split):
    x, y = test_split
    rs = RewardSet([build_reward(n) for n in DIGIT_REWARDS])
    out = rs(x[:6], prompts_for(y[:6]))
    assert out.shape == (6, 3) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(out[:, 1], build_reward("stroke-quality")(x[:6], [""] * 6))
