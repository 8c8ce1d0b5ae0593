"""The video world's trackers, rewards and eval-only metrics against hand-built clips."""

import math

import pytest
import torch

from otca.worlds.video import metrics, rewards
from otca.worlds.video.data import FRAMES, SPEED_PX, load_source_digits, render_clips, sample_clips, track_centres
from otca.worlds.video.prompts import DIRECTIONS, EVAL_TEMPLATES, UnknownPromptError, all_prompts, make_prompt
from otca.worlds.video.tracking import centroid_track, correlation_shifts

RIGHT, LEFT, UP, DOWN = (DIRECTIONS.index(d) for d in ("right", "left", "up", "down"))


def square_clip(step: tuple[int, int], frames: int = FRAMES, size: int = 16, start: tuple[int, int] = (3, 6)
                ) -> torch.Tensor:
    """A 4x4 white square whose top-left corner moves by ``step`` (dx, dy) integer px per frame: ``[1, 1, F, H, W]``."""
    clip = torch.zeros(1, 1, frames, size, size)
    for f in range(frames):
        x, y = start[0] + f * step[0], start[1] + f * step[1]
        clip[0, 0, f, y : y + 4, x : x + 4] = 1.0
    return clip


def digit_clip(digit_index: int, direction: int, speed: int) -> torch.Tensor:
    """A real test digit on the centred track of ``direction`` and ``speed``: ``[1, 1, F, 16, 16]``."""
    x, _ = load_source_digits("test")
    return render_clips(x[digit_index : digit_index + 1],
                        track_centres(torch.tensor([direction]), torch.tensor([speed]), torch.zeros(1, 2)))


def test_trackers_measure_a_hand_built_square():
    """A square stepping 1 px per frame: both trackers read exactly that step."""
    clip = square_clip((1, 0), frames=6)
    velocity, residual = centroid_track(clip)
    torch.testing.assert_close(velocity, torch.tensor([[1.0, 0.0]]), atol=1e-5, rtol=0)
    assert residual.abs().max() < 1e-4
    shifts = correlation_shifts(clip)
    torch.testing.assert_close(shifts, torch.tensor([1.0, 0.0]).expand(1, 5, 2), atol=1e-5, rtol=0)
    down = correlation_shifts(square_clip((0, 1), frames=6))
    torch.testing.assert_close(down, torch.tensor([0.0, 1.0]).expand(1, 5, 2), atol=1e-5, rtol=0)


def test_correlation_tracker_sub_pixel_on_real_digits():
    """Real digits on analytic tracks: the summed shifts recover the displacement to 0.4 px on average and
    always within half the gap between the slow and quick tracks (parabolic refinement is biased towards
    whole pixels, and the bias adds up over 7 shifts)."""
    g = torch.Generator().manual_seed(0)
    b = sample_clips(64, g, "test")
    disp, _ = metrics.measured_motion(b.clips)
    want = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])[b.direction]
    want = want * torch.tensor(SPEED_PX)[b.speed][:, None] * (FRAMES - 1)
    err = (disp - want).norm(dim=-1)
    assert err.mean() < 0.4 and err.max() < SPEED_PX[0] * (FRAMES - 1) / 2


def test_static_clip_has_no_dynamic_degree_and_no_direction():
    still = square_clip((0, 0))
    assert metrics.dynamic(still).tolist() == [False]
    assert metrics.judged_direction(still).tolist() == [-1]
    assert metrics.measured_motion(still)[1].item() == pytest.approx(0.0, abs=1e-6)
    assert metrics.motion_smoothness(still).item() == pytest.approx(1.0, abs=1e-6)
    assert metrics.temporal_flicker(still).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("step, want", [((1, 0), RIGHT), ((-1, 0), LEFT), ((0, -1), UP), ((0, 1), DOWN)])
def test_moving_square_is_judged_in_its_direction(step, want):
    clip = square_clip(step, start=(10, 10) if min(step) < 0 else (3, 3))  # stays inside the 16x16 canvas
    assert metrics.judged_direction(clip).tolist() == [want]
    assert metrics.dynamic(clip).tolist() == [True]


def test_real_digit_moving_right_is_judged_right_and_quick():
    clip = digit_clip(0, RIGHT, 1)
    assert metrics.judged_direction(clip).tolist() == [RIGHT]
    assert metrics.judged_speed(clip).tolist() == [1]
    assert metrics.judged_speed(digit_clip(0, RIGHT, 0)).tolist() == [0]


def test_flicker_and_jerk_lower_their_metrics():
    clip = digit_clip(3, RIGHT, 1)
    flicker = clip * torch.tensor([1.0, 0.3, 1.0, 0.3, 1.0, 0.3, 1.0, 0.3]).view(1, 1, -1, 1, 1)
    assert metrics.temporal_flicker(clip).item() > 0.85 > 0.6 > metrics.temporal_flicker(flicker).item()
    x, _ = load_source_digits("test")
    jerky = render_clips(x[3:4], torch.tensor([[[-3.0, 0], [1, 0], [-2, 0], [2, 0], [-1, 0], [3, 0], [0, 0], [3, 0]]]))
    assert metrics.motion_smoothness(clip).item() > 0.85 > 0.5 > metrics.motion_smoothness(jerky).item()


def test_subject_consistency_drops_when_the_digit_changes():
    x, y = load_source_digits("test")
    i, j = int((y == 0).nonzero()[0]), int((y == 1).nonzero()[0])
    centres = torch.zeros(1, FRAMES, 2)
    same = render_clips(x[i : i + 1], centres)
    swap = render_clips(torch.stack([x[i], x[j]]), centres[:, :1].expand(2, FRAMES, 2).contiguous())
    mixed = torch.cat([swap[:1, :, :4], swap[1:, :, 4:]], dim=2)  # a zero turning into a one half-way
    assert metrics.subject_consistency(same).item() == pytest.approx(1.0, abs=1e-5)
    assert metrics.subject_consistency(mixed).item() < 0.9


def test_evaluate_video_shows_the_static_hack():
    """Real clips of the held-out prompts vs the same digits standing still and centred: the still clips win
    visual quality (the reward), and lose dynamic degree and direction accuracy (the judges)."""
    prompts = all_prompts("eval")
    motions = [rewards.prompt_motion(p) for p in prompts]
    from otca.worlds.video.data import clips_for

    real = clips_for(motions, torch.Generator().manual_seed(0)).clips
    x, y = load_source_digits("test")
    pick = torch.stack([(y == m.digit).nonzero()[0, 0] for m in motions])
    still = render_clips(x[pick], torch.zeros(len(prompts), FRAMES, 2))
    ids = torch.arange(len(prompts))
    with pytest.warns(UserWarning, match="fd_size"):
        m_real = metrics.evaluate_video(real, prompts, ids, fd_size=100)
    m_still = metrics.evaluate_video(still, prompts, ids, fd_size=len(prompts))
    assert m_real["eval/dynamic_degree"] == 1.0 and m_still["eval/dynamic_degree"] == 0.0
    assert m_real["eval/direction_accuracy"] > 0.95 and m_still["eval/direction_accuracy"] == 0.0
    assert m_real["eval/digit_accuracy"] > 0.7
    assert m_real["eval/fvd"] < m_still["eval/fvd"]
    assert math.isnan(m_real["eval/diversity"])  # one clip per group: undefined, not 0
    assert rewards.visual_quality(still).mean() > rewards.visual_quality(real).mean()


def test_rewards_shapes_ranges_and_orderings():
    g = torch.Generator().manual_seed(2)
    b = sample_clips(16, g, "test")
    prompts = b.prompts(g, "eval")
    r = rewards.video_rewards(b.clips, prompts)
    assert r.shape == (16, 3) and r.dtype == torch.float32 and r.min() >= 0 and r.max() <= 1
    torch.testing.assert_close(r[:, 0], rewards.VideoReward("video-visual-quality")(b.clips, prompts))
    torch.testing.assert_close(r[:, 2], rewards.VideoReward("video-text-alignment")(b.clips, prompts))
    torch.testing.assert_close(r, rewards.VideoAlignRewards()(b.clips, prompts))
    assert r[:, 2].mean() > 0.8 and r[:, 1].mean() > 0.7  # real clips are aligned and move well
    empty, noise = torch.zeros_like(b.clips), torch.rand(b.clips.shape, generator=g)
    assert rewards.video_rewards(empty, prompts).max() < 0.05
    assert rewards.video_rewards(noise, prompts)[:, [0, 2]].max() < 0.05
    # the wrong direction (reversed clips) keeps VQ and MQ and loses TA
    rev = rewards.video_rewards(b.clips.flip(2), prompts)
    torch.testing.assert_close(rev[:, 0], r[:, 0], atol=1e-6, rtol=0)
    assert (rev[:, 2] < 0.05).all()


def test_text_alignment_is_its_formula_on_a_hand_built_clip():
    """TA = mean_f p_f(digit) * exp(-|d - d*|^2 / (2 sigma^2)): a still clip asked to move slowly right misses
    by the slow track's 2.8 px."""
    clip = digit_clip(5, RIGHT, 0)
    x, y = load_source_digits("test")
    still = render_clips(x[5:6], torch.zeros(1, FRAMES, 2))
    prompt = [make_prompt(EVAL_TEMPLATES[0][0], int(y[5]), RIGHT)]
    p = rewards._frame_probs(still, rewards.ASSETS_DIR)[0, :, int(y[5])].mean()
    want = p * math.exp(-((SPEED_PX[0] * (FRAMES - 1)) ** 2) / (2 * rewards.MOTION_SIGMA**2))
    assert rewards.text_alignment(still, prompt).item() == pytest.approx(want.item(), rel=1e-4)
    assert rewards.text_alignment(clip, prompt).item() > 0.8


def test_motion_quality_is_its_formula_and_graded_at_generated_clips_flicker():
    """MQ = exp(-(rms/TRACK_SCALE)^2) * exp(-cv/INK_CV_SCALE) * identity * presence on a real clip whose odd frames
    are dimmed to 0.85 (ink cv ~0.08, the base model's median): every factor by hand (cv from the pixel sums). The
    flicker costs it less than half its score, so MQ ranks generated clips instead of scoring them all ~0."""
    clip = digit_clip(5, RIGHT, 0)
    dim = torch.tensor([1.0 if f % 2 == 0 else 0.85 for f in range(FRAMES)]).view(1, 1, FRAMES, 1, 1)
    flicker = clip * dim
    mass = flicker.sum(dim=(0, 1, 3, 4))  # [F]
    cv = float(mass.std() / mass.mean())
    assert 0.06 < cv < 0.1
    _, residual = centroid_track(flicker)  # dimming a frame leaves its centroid where it was
    rms = float(residual.pow(2).sum(dim=-1).mean().sqrt())
    p = rewards._frame_probs(flicker, rewards.ASSETS_DIR)[0]  # [F, 10]
    identity = float(p[:, int(p.mean(dim=0).argmax())].mean())
    presence = min(1.0, float(flicker.mean()) / rewards.INK_BAND[0])
    want = math.exp(-((rms / rewards.TRACK_SCALE) ** 2)) * math.exp(-cv / rewards.INK_CV_SCALE) * identity * presence
    got = rewards.motion_quality(flicker).item()
    assert got == pytest.approx(want, rel=1e-4)
    assert 0.4 * rewards.motion_quality(clip).item() < got < rewards.motion_quality(clip).item()


def test_bad_inputs_are_one_line_errors():
    clip = digit_clip(0, RIGHT, 0)
    with pytest.raises(ValueError, match=r"clips \[B, 1, F >= 2, H, W\]"):
        rewards.visual_quality(clip[:, :, 0])
    with pytest.raises(ValueError, match="2 prompts for 1 clips"):
        rewards.text_alignment(clip, ["a neat zero creeping left"] * 2)
    with pytest.raises(UnknownPromptError):
        rewards.text_alignment(clip, ["a zero dancing"])
    with pytest.raises(ValueError, match="expected one of"):
        rewards.VideoReward("video-aesthetics")
