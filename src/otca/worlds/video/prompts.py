"""The prompt vocabulary of the video world: which digit, which way and how fast, in a fixed set of phrasings.

Every prompt names a digit (0-9), a direction (left, right, up, down) and, through its verb or adverb, a speed
(slow or quick). Training and held-out evaluation prompts use disjoint phrasings; the text encoder is pretrained
on all of them, so the held-out prompts test the fine-tuned policy's generalisation, not the tokenizer's.
"""

from __future__ import annotations

from dataclasses import dataclass

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIRECTIONS = ("left", "right", "up", "down")
SPEEDS = ("slow", "quick")

# {w}: the digit as a word, {n}: as a numeral, {d}: the direction. Each template fixes the speed.
TRAIN_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("a handwritten {w} drifting {d}", "slow"),
    ("the digit {w} moving {d} slowly", "slow"),
    ("digit {n} sliding {d} slowly", "slow"),
    ("a {w} moving {d} quickly", "quick"),
    ("the number {n} racing {d}", "quick"),
    ("a handwritten {w} moving {d} fast", "quick"),
)
EVAL_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("a neat {w} creeping {d}", "slow"),
    ("the digit {n} rushing {d}", "quick"),
)
SPLITS = {"train": TRAIN_TEMPLATES, "eval": EVAL_TEMPLATES, "all": TRAIN_TEMPLATES + EVAL_TEMPLATES}


class UnknownPromptError(ValueError):
    """A prompt outside the video world's vocabulary."""


@dataclass(frozen=True)
class Motion:
    """What a prompt asks for: the digit, the direction index into DIRECTIONS, the speed index into SPEEDS."""

    digit: int
    direction: int
    speed: int


def make_prompt(template: str, digit: int, direction: int) -> str:
    return template.format(w=DIGIT_WORDS[digit], n=digit, d=DIRECTIONS[direction])


def all_prompts(split: str = "all") -> list[str]:
    """Every prompt of a split ('train', 'eval' or 'all'): digit-major, then direction, then template."""
    if split not in SPLITS:
        raise ValueError(f"prompt split '{split}': expected one of {sorted(SPLITS)}")
    return [make_prompt(t, d, k) for d in range(10) for k in range(len(DIRECTIONS)) for t, _ in SPLITS[split]]


_MOTION_OF = {
    make_prompt(t, d, k): Motion(d, k, SPEEDS.index(s))
    for d in range(10)
    for k in range(len(DIRECTIONS))
    for t, s in SPLITS["all"]
}


def prompt_motion(prompt: str) -> Motion:
    """The digit, direction and speed a prompt asks for; an unknown prompt is a one-line error naming it."""
    try:
        return _MOTION_OF[prompt.strip().lower()]
    except KeyError:
        raise UnknownPromptError(
            f"unknown prompt {prompt!r}: the video world knows {len(_MOTION_OF)} phrasings such as "
            f"'a handwritten three drifting left' or 'a seven moving up quickly' "
            f"(list them with otca.worlds.video.prompts.all_prompts())"
        ) from None


def phrasings(split: str = "all") -> dict[Motion, list[str]]:
    """For each (digit, direction, speed), every phrasing of it in ``split``."""
    out: dict[Motion, list[str]] = {}
    for p in all_prompts(split):
        out.setdefault(prompt_motion(p), []).append(p)
    return out
