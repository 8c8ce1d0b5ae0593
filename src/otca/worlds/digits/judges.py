"""The digits world's two digit recognisers: the training-time classifier and the out-of-domain judge.

The classifier (a small CNN) is what the "digit-alignment" reward asks. The judge (an MLP on raw pixels,
trained with a different augmentation) is asked only by the eval metrics: a policy that learns the
classifier's blind spots should not also fool the measurement, so the two share no architecture and no
augmentation. Both read ``[B, 1, 16, 16]`` pixels in [0, 1] and are trained by :func:`train_judges` on the
train split; the shipped weights live in ``src/otca/assets`` as safetensors plus a small JSON config.

Regenerate the shipped weights with ``python -m otca.worlds.digits.judges [out_dir]``.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from otca.worlds.digits.data import IMAGE_SIZE, load_digit_images
from otca.worlds.digits.prompts import prompt_digit

ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets"  # src/otca/assets
CLASSIFIER = "digits_classifier"
JUDGE = "digits_judge"
N_CLASSES = 10
EPOCHS = 30


class JudgeAssetError(RuntimeError):
    """A recogniser's weights or config file is missing or unreadable."""


class DigitCNN(nn.Module):
    """The training-time classifier: three 3x3 conv layers, two 2x2 max-pools, a linear head.

    ``[B, 1, 16, 16]`` in [0, 1] -> logits ``[B, 10]``; ``features`` is the flattened last conv block.
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 64)):
        super().__init__()
        c1, c2, c3 = channels
        self.config = {"channels": list(channels)}
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # [B, c2, 8, 8]
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # [B, c3, 4, 4]
            nn.Flatten(),  # [B, c3 * 16]
        )
        self.head = nn.Linear(c3 * (IMAGE_SIZE // 4) ** 2, N_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # [B, D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # [B, 10]


class DigitMLP(nn.Module):
    """The out-of-domain judge: an MLP on the 256 raw pixels, ReLU and dropout between layers.

    ``[B, 1, 16, 16]`` in [0, 1] -> logits ``[B, 10]``; ``features`` is the last hidden layer (the Fréchet
    distance's feature space, so keep it narrow: the covariance is estimated from a few hundred samples).
    """

    def __init__(self, hidden: Sequence[int] = (128, 32), dropout: float = 0.2):
        super().__init__()
        self.config = {"hidden": list(hidden), "dropout": dropout}
        layers: list[nn.Module] = [nn.Flatten()]
        width = IMAGE_SIZE * IMAGE_SIZE
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, N_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # [B, D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # [B, 10]


@dataclass(frozen=True)
class Recipe:
    """How one recogniser is trained; the two recipes differ so that their off-manifold errors differ."""

    max_shift: float  # pixels, uniform per sample and axis
    max_rotate: float  # degrees
    max_zoom: float  # relative scale change, uniform in [1 - z, 1 + z]
    blur_prob: float  # share of samples mixed with a 3x3 Gaussian blur at a random strength
    max_noise: float  # Gaussian pixel noise, std uniform in [0, max_noise]
    outlier_frac: float  # outlier images per real image, trained towards the uniform distribution
    lr: float
    batch: int = 64


CLASSIFIER_RECIPE = Recipe(max_shift=1.5, max_rotate=0.0, max_zoom=0.0, blur_prob=0.5, max_noise=0.1,
                           outlier_frac=0.125, lr=3e-3)
JUDGE_RECIPE = Recipe(max_shift=1.0, max_rotate=12.0, max_zoom=0.1, blur_prob=0.0, max_noise=0.0,
                      outlier_frac=0.0, lr=2e-3)


def as_digit_pixels(pixels: torch.Tensor, who: str) -> torch.Tensor:
    """``pixels [B, 1, 16, 16]`` on any device -> the same on CPU in float32; another shape is a one-line error."""
    if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"{who}: pixels must be [B, 1, {IMAGE_SIZE}, {IMAGE_SIZE}] in [0, 1], "
                         f"got shape {tuple(pixels.shape)}")
    return pixels.detach().to("cpu", torch.float32)


def prompted_digits(prompts: Sequence[str], batch: int, who: str) -> torch.Tensor:
    """The digit each prompt asks for, ``[B]`` long; a count other than ``batch`` is a one-line error and an
    unknown prompt raises :class:`~otca.worlds.digits.prompts.UnknownPromptError`."""
    if len(prompts) != batch:
        raise ValueError(f"{who}: got {len(prompts)} prompts for {batch} images")
    return torch.tensor([prompt_digit(p) for p in prompts], dtype=torch.long)  # [B]


@torch.no_grad()
def prompted_probability(model: nn.Module, pixels: torch.Tensor, prompts: Sequence[str], who: str) -> torch.Tensor:
    """``p(prompted digit | pixels)`` under ``model``: ``[B]`` float32 on CPU (prompts as in prompted_digits)."""
    x = as_digit_pixels(pixels, who)  # [B, 1, 16, 16]
    digits = prompted_digits(prompts, x.shape[0], who)  # [B]
    probs = model(x).softmax(dim=-1)  # [B, 10]
    return probs.gather(1, digits[:, None]).squeeze(1)  # [B]


# --- training -------------------------------------------------------------------------------------------


def _blur3(x: torch.Tensor) -> torch.Tensor:
    """A 3x3 binomial (Gaussian-like) blur with replicate padding; ``[N, 1, H, W]`` -> same."""
    k = torch.tensor([1.0, 2.0, 1.0])
    k2 = (k[:, None] * k[None, :] / 16.0)[None, None]  # [1, 1, 3, 3]
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k2)


def _sym_uniform(*shape: int) -> torch.Tensor:
    return torch.rand(*shape) * 2 - 1  # uniform in [-1, 1]


def augment(x: torch.Tensor, r: Recipe) -> torch.Tensor:
    """Random affine warp, blur and noise from the global RNG; ``[N, 1, H, W]`` in [0, 1] -> same."""
    n, _, h, w = x.shape
    angle = _sym_uniform(n) * math.radians(r.max_rotate)  # [N]
    zoom = 1 + _sym_uniform(n) * r.max_zoom  # [N]
    shift = _sym_uniform(n, 2) * r.max_shift * 2 / torch.tensor([w, h])  # [N, 2] in affine_grid's [-1, 1] units
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # [N, H, W, 2]
    x = F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)
    strength = torch.rand(n, 1, 1, 1) * (torch.rand(n, 1, 1, 1) < r.blur_prob)  # [N, 1, 1, 1]
    x = x + strength * (_blur3(x) - x)
    x = x + torch.rand(n, 1, 1, 1) * r.max_noise * torch.randn_like(x)
    return x.clamp(0.0, 1.0)


def outlier_images(n: int) -> torch.Tensor:
    """Off-manifold images for outlier exposure (Hendrycks et al. 2019): uniform noise, flat grey levels and
    smooth random blobs, a third each on average; ``[n, 1, 16, 16]`` in [0, 1]."""
    s = (n, 1, IMAGE_SIZE, IMAGE_SIZE)
    noise = torch.rand(s)
    flat = torch.rand(n, 1, 1, 1).expand(s)
    blobs = F.interpolate(torch.rand(n, 1, 4, 4), size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    kind = torch.randint(3, (n, 1, 1, 1))
    return torch.where(kind == 0, noise, torch.where(kind == 1, flat, blobs))


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, r: Recipe, epochs: int) -> None:
    """AdamW with a cosine learning rate on augmented batches; outliers target the uniform distribution."""
    steps = epochs * math.ceil(len(y) / r.batch)
    opt = torch.optim.AdamW(model.parameters(), lr=r.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(r.batch):
            n_out = round(r.outlier_frac * len(idx))
            xb = torch.cat([augment(x[idx], r), outlier_images(n_out)])  # [b + n_out, 1, 16, 16]
            target = torch.cat([F.one_hot(y[idx], N_CLASSES).float(),
                                torch.full((n_out, N_CLASSES), 1.0 / N_CLASSES)])  # [b + n_out, 10]
            loss = F.cross_entropy(model(xb), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of ``x [N, 1, 16, 16]`` whose argmax class equals ``y [N]``."""
    return (model(x).argmax(-1) == y).float().mean().item()


def train_judges(out_dir: str | Path, *, seed: int = 0, epochs: int = EPOCHS) -> dict[str, float]:
    """Train the classifier and the judge on the train split and write ``{stem}.safetensors`` + ``{stem}.json``
    for each into ``out_dir``; returns their test-split accuracies by stem.

    Deterministic for a given seed and torch build: it runs single-threaded (the thread count changes the
    float summation order) on a forked global RNG, which it leaves as it found it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x, y = load_digit_images("train")
    xt, yt = load_digit_images("test")
    threads = torch.get_num_threads()
    accs = {}
    try:
        torch.set_num_threads(1)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            for stem, model, recipe in ((CLASSIFIER, DigitCNN(), CLASSIFIER_RECIPE), (JUDGE, DigitMLP(), JUDGE_RECIPE)):
                fit(model, x, y, recipe, epochs)
                accs[stem] = accuracy(model, xt, yt)
                save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / f"{stem}.safetensors")
                meta = {"arch": model.config, "recipe": asdict(recipe), "seed": seed, "epochs": epochs,
                        "test_accuracy": accs[stem]}
                (out / f"{stem}.json").write_text(json.dumps(meta, indent=2) + "\n")
    finally:
        torch.set_num_threads(threads)
    return accs


# --- loading --------------------------------------------------------------------------------------------


M = TypeVar("M", bound=nn.Module)


def _load(stem: str, cls: type[M], assets_dir: Path) -> M:
    """Build ``cls`` from ``{stem}.json`` and load ``{stem}.safetensors``; a bad file is a one-line error."""
    cfg_path, w_path = assets_dir / f"{stem}.json", assets_dir / f"{stem}.safetensors"
    for path in (cfg_path, w_path):
        if not path.is_file():
            raise JudgeAssetError(f"{path}: missing; rebuild it with `python -m otca.worlds.digits.judges`")
    try:
        model = cls(**json.loads(cfg_path.read_text())["arch"])
    except (ValueError, KeyError, TypeError) as e:
        raise JudgeAssetError(f"{cfg_path}: not a valid recogniser config ({type(e).__name__}: {e})") from None
    try:
        model.load_state_dict(load_file(w_path))
    except Exception as e:  # safetensors' header errors and load_state_dict's mismatches alike
        raise JudgeAssetError(f"{w_path}: unreadable or not matching {cfg_path.name} "
                              f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return model.eval().requires_grad_(False)


@lru_cache(maxsize=4)
def load_classifier(assets_dir: Path = ASSETS_DIR) -> DigitCNN:
    """The shipped training-time classifier, in eval mode and frozen (cached: do not train it)."""
    return _load(CLASSIFIER, DigitCNN, Path(assets_dir))


@lru_cache(maxsize=4)
def load_judge(assets_dir: Path = ASSETS_DIR) -> DigitMLP:
    """The shipped out-of-domain judge, in eval mode and frozen (cached: do not train it)."""
    return _load(JUDGE, DigitMLP, Path(assets_dir))


if __name__ == "__main__":
    print(train_judges(sys.argv[1] if len(sys.argv) > 1 else ASSETS_DIR))
