"""The prompt vocabulary of the digits world: a fixed set of phrasings per digit.

Training prompts and held-out evaluation prompts use disjoint phrasings; the text encoder is pretrained on
all of them, so the eval prompts test generalisation of the fine-tuned policy, not of the tokenizer.
"""

from __future__ import annotations

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# {w}: the digit as a word, {n}: as a numeral.
TRAIN_TEMPLATES = (
    "a handwritten {w}",
    "the digit {w}",
    "a drawing of the number {w}",
    "the number {n}, handwritten",
    "digit {n}",
)
EVAL_TEMPLATES = (
    "a neat handwritten {w}",
    "an image of the digit {n}",
)
SPLITS = {"train": TRAIN_TEMPLATES, "eval": EVAL_TEMPLATES, "all": TRAIN_TEMPLATES + EVAL_TEMPLATES}


class UnknownPromptError(ValueError):
    """A prompt outside the digits world's vocabulary."""


def make_prompt(template: str, digit: int) -> str:
    return template.format(w=DIGIT_WORDS[digit], n=digit)


def all_prompts(split: str = "all") -> list[str]:
    """Every prompt of a split ('train', 'eval' or 'all'), digit-major order."""
    if split not in SPLITS:
        raise ValueError(f"prompt split '{split}': expected one of {sorted(SPLITS)}")
    return [make_prompt(t, d) for d in range(10) for t in SPLITS[split]]


_DIGIT_OF = {p: d for d in range(10) for p in (make_prompt(t, d) for t in SPLITS["all"])}


def prompt_digit(prompt: str) -> int:
    """The digit a prompt asks for; an unknown prompt is a one-line error naming it."""
    try:
        return _DIGIT_OF[prompt.strip().lower()]
    except KeyError:
        raise UnknownPromptError(
            f"unknown prompt {prompt!r}: the digits world knows {len(_DIGIT_OF)} phrasings such as "
            f"'a handwritten seven' or 'digit 7' (list them with otca.worlds.digits.prompts.all_prompts())"
        ) from None
