"""Where a centered crop starts: the one rounding rule in which the reference preprocessings differ.

A crop of ``crop`` pixels out of ``size`` leaves a margin ``size - crop``; when it is odd, half a pixel must be
rounded. transformers' image processors (``CLIPImageProcessor``, both backends: ``image_transforms.center_crop``
and the torchvision backend's ``int((size - crop) / 2.0)``) take the floor; torchvision's ``CenterCrop``
(``transforms/functional.py`` and ``transforms/v2``: ``int(round((size - crop) / 2.0))``) rounds half to even,
Python's ``round``. CLIP-T and PickScore follow transformers; ImageReward and the LAION aesthetic predictor
preprocess with torchvision (``Resize`` + ``CenterCrop``), so a 224x299 image starts 38 px in there, not 37.
"""

from __future__ import annotations

from typing import Literal

CropRounding = Literal["floor", "half-even"]

ROUNDINGS: tuple[CropRounding, ...] = ("floor", "half-even")


def crop_offset(size: int, crop: int, rounding: CropRounding = "floor") -> int:
    """Top (or left) offset of a centered ``crop`` out of ``size`` (``0 <= crop <= size``): ``(size - crop) // 2``
    for ``"floor"`` (transformers), ``round((size - crop) / 2)`` with halves to even for ``"half-even"``
    (torchvision). They differ exactly when the margin is ``3 mod 4`` (37.5 -> 38, but 36.5 -> 36)."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding: expected one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    if not 0 <= crop <= size:
        raise ValueError(f"center crop: crop {crop} must be between 0 and the image size {size}")
    margin = size - crop
    if rounding == "floor":
        return margin // 2
    return round(margin / 2)  # margin / 2 is exact in binary: round() sees the true half
