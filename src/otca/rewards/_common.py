"""Shared plumbing of the model-based rewards: weight-path checks, safe loading, tensor preprocessing, the
batched scoring loop of the image rewards (:class:`ImageModelReward`).

Contracts:
  * every path check fails with a one-line ``FileNotFoundError`` naming the reward, the file and the option
    to set;
  * ``options.tiny: true`` builds a tiny random backbone of the same architecture in-process instead (no
    files): a test/demo twin whose scores carry no meaning, so that configs run offline end to end;
  * ``options.frames: true`` lets an image reward score videos frame by frame (:class:`FrameMean`);
  * checkpoints load through safetensors or ``torch.load(weights_only=True)``; no remote code, ever;
  * heavy packages (transformers) are imported inside the functions that need them, so ``import
    otca.rewards`` and reward registration stay cheap;
  * preprocessing works on ``[B, 3, H, W]`` float tensors in [0, 1] with torch ops only (differentiable,
    any device), reproducing the reference PIL/torchvision pipelines up to resampling round-off.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from otca.rewards.crop import CropRounding, crop_offset

# OpenAI CLIP pixel statistics: CLIP, HPS, PickScore, the LAION aesthetic head and ImageReward all use them.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# PIL resample codes as stored in transformers' preprocessor_config.json -> torch interpolate modes.
_RESAMPLE = {2: "bilinear", 3: "bicubic"}


# ---------------------------------------------------------------------------------------------- paths and loading


def option_hint(reward: str, option: str) -> str:
    """The tail of every path error: which option of which reward to set."""
    return f"(set options.{option} of reward '{reward}')"


def require_file(reward: str, path: str | Path | None, option: str = "path", what: str = "weights file") -> Path:
    """``path`` as a Path if it is an existing file, else a one-line FileNotFoundError naming everything."""
    if not path:
        raise FileNotFoundError(f"reward '{reward}': no {what} given {option_hint(reward, option)}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"reward '{reward}': {what} '{p}' not found {option_hint(reward, option)}")
    return p


def require_dir(
    reward: str, path: str | Path | None, option: str, what: str, needs: Sequence[str] = ()
) -> Path:
    """``path`` as a Path if it is a directory holding every file in ``needs``, else a one-line error."""
    if not path:
        raise FileNotFoundError(f"reward '{reward}': no {what} given {option_hint(reward, option)}")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"reward '{reward}': {what} '{p}' not found {option_hint(reward, option)}")
    for name in needs:
        if not (p / name).is_file():
            raise FileNotFoundError(
                f"reward '{reward}': '{p / name}' not found: {what} '{p}' is incomplete {option_hint(reward, option)}"
            )
    return p


def load_checkpoint(reward: str, path: Path) -> Any:
    """A checkpoint's content, loaded safely on CPU: safetensors, or pickle restricted to tensors and containers.

    Some released files (the LAION aesthetic head) store tensors on ``cuda:0``: ``map_location`` fixes that.
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if path.suffix in (".pt", ".pth", ".bin"):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # an unsafe pickle is refused, never executed
            raise ValueError(
                f"reward '{reward}': '{path}' is not loadable with torch.load(weights_only=True): "
                f"{type(e).__name__}: {str(e).splitlines()[0]}"
            ) from e
    raise ValueError(
        f"reward '{reward}': '{path}' has suffix '{path.suffix}', expected .safetensors, .pt, .pth or .bin"
    )


def tensor_dict(reward: str, path: Path, obj: Any, key: str | None = None) -> dict[str, torch.Tensor]:
    """The ``{name: tensor}`` mapping inside a loaded checkpoint (under ``key`` when given)."""
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            found = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"reward '{reward}': '{path}' has no '{key}' entry (found {found})")
        obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"reward '{reward}': '{path}' does not hold a {{name: tensor}} state dict")
    return dict(obj)


def torch_dtype(reward: str, name: str | torch.dtype) -> torch.dtype:
    """``"float32" | "float16" | "bfloat16"`` (or a torch dtype) -> torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"reward '{reward}': dtype '{name}' unknown, expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def tiny_backbone(reward: str, tiny: bool, **paths: str | None) -> bool:
    """``tiny``, after checking that no weight path is set along with it (one-line error naming the option)."""
    given = [k for k, v in paths.items() if v]
    if tiny and given:
        raise ValueError(
            f"reward '{reward}': options.tiny builds a random backbone in-process; leave options.{given[0]} unset"
        )
    return tiny


def seeded(seed: int, build: Callable[[], Any]) -> Any:
    """``build()`` under ``torch.manual_seed(seed)``, leaving the global RNG as it was (tiny random twins)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def positive_int(reward: str, option: str, value: int) -> int:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"reward '{reward}': option {option}={value!r}, expected a positive integer")
    return value


def transformers_module():
    """transformers, imported on first use only (it costs seconds and is needed only by model rewards)."""
    import transformers

    return transformers


# ------------------------------------------------------------------------------------------------- input checks


def _check_pixels(reward: str, pixels: torch.Tensor, prompts: Sequence[str], layout: str) -> torch.Tensor:
    """Validated float32 RGB pixels in [0, 1] of the given layout; one channel is repeated (PIL's L -> RGB)."""
    kind = "images" if layout == "[B, C, H, W]" else "videos"
    if pixels.ndim != len(layout.split(",")) or pixels.shape[1] not in (1, 3):
        raise ValueError(f"reward '{reward}': expects {kind} {layout} with C in (1, 3), got {tuple(pixels.shape)}")
    if len(prompts) != pixels.shape[0]:
        raise ValueError(f"reward '{reward}': {pixels.shape[0]} {kind} but {len(prompts)} prompts")
    x = pixels.detach().to(torch.float32)
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1 + 1e-3:  # a [-1, 1] tensor passed by mistake would silently score garbage
        raise ValueError(f"reward '{reward}': pixels must lie in [0, 1], got range [{lo:.3f}, {hi:.3f}]")
    return x.clamp(0, 1).expand(-1, 3, *pixels.shape[2:])


def check_images(reward: str, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Validated float32 RGB images ``[B, 3, H, W]`` in [0, 1]."""
    return _check_pixels(reward, pixels, prompts, "[B, C, H, W]")


def check_videos(reward: str, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Validated float32 RGB videos ``[B, 3, F, H, W]`` in [0, 1]."""
    return _check_pixels(reward, pixels, prompts, "[B, C, F, H, W]")


class FrameMean:
    """An image reward applied to videos: ``[B, C, F, H, W]`` -> the mean over the F frames of the per-frame
    scores ``[B]`` float32, each frame scored with its video's prompt. Images ``[B, C, H, W]`` pass through.

    This is how VBench scores videos with image models (aesthetic and imaging quality: per-frame mean) and
    how CLIPSIM measures video-text alignment; it ignores motion, which only a video model can judge.
    """

    def __init__(self, reward: Any):
        self.reward = reward
        self.name = reward.name

    def __call__(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if pixels.ndim != 5:
            return self.reward(pixels, prompts)
        x = check_videos(self.name, pixels, prompts)  # [B, 3, F, H, W]
        b, c, f, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * f, c, h, w)  # [B*F, 3, H, W], video-major
        scores = self.reward(frames, [p for p in prompts for _ in range(f)])  # [B*F]
        return scores.view(b, f).mean(dim=1)  # [B]


def per_frame(reward: Any, frames: bool) -> Any:
    """``reward``, wrapped in :class:`FrameMean` when ``frames`` (the rewards' ``frames`` option)."""
    return FrameMean(reward) if frames else reward


class ImageModelReward:
    """Base of the image rewards that run a model: ``(pixels [B, C, H, W] in [0, 1], prompts) -> [B]`` float32 on
    CPU, the input checked (:func:`check_images`), ``batch_size`` samples at a time, in eval without gradients.

    Each chunk is preprocessed by ``prep`` in fp32 on the model's device, cast to the model's dtype (both read
    from ``model``'s parameters), and scored by the subclass's :meth:`score`.
    """

    def __init__(
        self, name: str, model: torch.nn.Module, prep: Callable[[torch.Tensor], torch.Tensor], batch_size: int
    ):
        self.name = name
        self.prep = prep
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.batch_size = positive_int(name, "batch_size", batch_size)

    def score(self, x: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Scores ``[b]`` of preprocessed pixels ``x [b, 3, S, S]`` (model device and dtype) and their prompts."""
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        x, n = check_images(self.name, pixels, prompts), self.batch_size
        out = [self._chunk(x[i : i + n], list(prompts[i : i + n])) for i in range(0, x.shape[0], n)]
        return torch.cat(out)  # [B]

    def _chunk(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = self.prep(pixels.to(self.device)).to(self.dtype)  # [b, 3, S, S]; fp32 preprocessing
        return self.score(x, prompts).float().cpu()  # [b]


# ---------------------------------------------------------------------------------------------- preprocessing


def _resize(pixels: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Antialiased resize ``[B, C, H, W] -> [B, C, *size]``: torch's antialiased kernels follow PIL's (a=-0.5)."""
    if tuple(pixels.shape[-2:]) == tuple(size):
        return pixels
    return F.interpolate(pixels, size=size, mode=mode, antialias=True, align_corners=False)


def shortest_edge_size(h: int, w: int, short: int) -> tuple[int, int]:
    """Output (h, w) when the short side becomes ``short``: the long side is truncated, as in transformers'
    ``get_resize_output_image_size`` and torchvision's ``Resize(int)``."""
    if h <= w:
        return short, int(short * w / h)
    return int(short * h / w), short


def center_crop(pixels: torch.Tensor, crop: tuple[int, int], rounding: CropRounding = "floor") -> torch.Tensor:
    """Center crop ``[B, C, H, W] -> [B, C, *crop]``; an odd margin rounds as ``rounding`` says
    (:func:`~otca.rewards.crop.crop_offset`: "floor" = transformers, "half-even" = torchvision's CenterCrop)."""
    h, w = pixels.shape[-2:]
    ch, cw = crop
    if ch > h or cw > w:
        raise ValueError(f"center_crop: crop {crop} larger than image {(h, w)}")
    top, left = crop_offset(h, ch, rounding), crop_offset(w, cw, rounding)
    return pixels[..., top : top + ch, left : left + cw]


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-channel ``(x - mean) / std`` on ``[B, 3, H, W]``."""
    m = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    return (pixels - m) / s


@dataclass(frozen=True)
class CropPrep:
    """CLIP-style preprocessing: resize the shortest edge, center crop, normalize.

    The tensor twin of transformers' ``CLIPImageProcessor`` (``rounding="floor"``) and of torchvision's
    ``Resize(n, bicubic) + CenterCrop(n) + Normalize`` (``rounding="half-even"``) used by ImageReward and the
    LAION aesthetic predictor: the two place the crop of an odd margin differently (:mod:`otca.rewards.crop`).
    The reference pipelines resample uint8 PIL images, so values agree to ~1/255 before normalization.
    """

    shortest_edge: int
    crop: tuple[int, int]
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    mode: str = "bicubic"
    rounding: CropRounding = "floor"

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> ``[B, 3, *crop]`` normalized."""
        size = shortest_edge_size(*pixels.shape[-2:], self.shortest_edge)
        x = _resize(pixels, size, self.mode).clamp(0, 1)  # PIL saturates to uint8: bicubic overshoot is cut
        return normalize(center_crop(x, self.crop, self.rounding), self.mean, self.std)


@dataclass(frozen=True)
class LetterboxPrep:
    """HPS-style preprocessing: resize the *longest* edge to ``size``, pad the rest with 0 (black), normalize.

    The tensor twin of HPSv2's ``ResizeMaxSize(size, bicubic, fill=0)`` (hpsv2/src/open_clip/transform.py),
    which runs on tensors after ``ToTensor``: new side = round(side * size / max(H, W)), padding split
    floor/ceil (left/top get the floor), no crop, and no clamping of the bicubic overshoot.
    """

    size: int
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    mode: str = "bicubic"

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> ``[B, 3, size, size]`` normalized."""
        h, w = pixels.shape[-2:]
        scale = self.size / max(h, w)
        nh, nw = round(h * scale), round(w * scale)
        x = _resize(pixels, (nh, nw), self.mode)
        ph, pw = self.size - nh, self.size - nw
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)  # [B, 3, size, size]
        return normalize(x, self.mean, self.std)


def _size_field(reward: str, path: Path, cfg: dict, field: str, keys: Sequence[str]) -> tuple[int, ...]:
    v = cfg.get(field)
    if isinstance(v, int):
        return (v,) * len(keys)
    if isinstance(v, dict) and all(k in v for k in keys):
        return tuple(int(v[k]) for k in keys)
    raise ValueError(f"reward '{reward}': '{path}' field '{field}'={v!r}, expected an int or a dict with {list(keys)}")


def crop_prep_from_processor(reward: str, directory: Path, option: str) -> CropPrep:
    """A :class:`CropPrep` from a transformers ``preprocessor_config.json`` (CLIP image processor format).

    Only the CLIP pipeline (resize shortest edge, center crop, rescale 1/255, normalize) is supported; any
    other flag setting is an error rather than a silently different preprocessing.
    """
    path = require_dir(reward, directory, option, "processor directory", needs=("preprocessor_config.json",))
    path = path / "preprocessor_config.json"
    cfg = json.loads(path.read_text())
    for flag in ("do_resize", "do_center_crop", "do_normalize"):
        if not cfg.get(flag, True):
            raise ValueError(f"reward '{reward}': '{path}' sets {flag}=false; only the CLIP pipeline is supported")
    resample = cfg.get("resample", 3)
    if resample not in _RESAMPLE:
        raise ValueError(f"reward '{reward}': '{path}' resample={resample}, expected one of {sorted(_RESAMPLE)}")
    (short,) = _size_field(reward, path, cfg, "size", ("shortest_edge",))
    crop = _size_field(reward, path, cfg, "crop_size", ("height", "width"))
    return CropPrep(
        shortest_edge=short,
        crop=(crop[0], crop[1]),
        mean=tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)),
        std=tuple(cfg.get("image_std", OPENAI_CLIP_STD)),
        mode=_RESAMPLE[resample],
    )


# ------------------------------------------------------------------------------------------------ shared heads


def linear_chain(reward: str, path: Path, state: dict[str, torch.Tensor], prefix: str) -> torch.nn.Sequential:
    """The ``{prefix}layers.{i}.{weight,bias}`` Linear stack as one Sequential, in index order.

    The LAION aesthetic v2 head and ImageReward's head are Linear 768-1024-128-64-16-1 with Dropout between
    and no activation (improved-aesthetic-predictor simple_inference.py; ImageReward.py ``MLP``); at eval the
    dropouts are identities, so the Linear layers applied in order are the whole head.
    """
    idx = sorted({int(k[len(prefix) :].split(".")[1]) for k in state if k.startswith(prefix + "layers.")})
    if not idx:
        raise ValueError(f"reward '{reward}': '{path}' has no '{prefix}layers.N.weight' entries")
    layers = []
    for i in idx:
        w, b = state[f"{prefix}layers.{i}.weight"], state[f"{prefix}layers.{i}.bias"]
        if layers and w.shape[1] != layers[-1].out_features:
            raise ValueError(f"reward '{reward}': '{path}' layer {i} takes {w.shape[1]} inputs, previous gives "
                             f"{layers[-1].out_features}")
        lin = torch.nn.Linear(w.shape[1], w.shape[0])
        lin.load_state_dict({"weight": w.float(), "bias": b.float()})
        layers.append(lin)
    if layers[-1].out_features != 1:
        raise ValueError(f"reward '{reward}': '{path}' head ends in {layers[-1].out_features} outputs, expected 1")
    return torch.nn.Sequential(*layers).eval().requires_grad_(False)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``[B, D]`` scaled to unit L2 norm (in fp32)."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def square_side(reward: str, n_tokens: int, what: str) -> int:
    """sqrt of a square patch count (position-embedding rows minus the class token)."""
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ValueError(f"reward '{reward}': {what} has {n_tokens} patch positions, not a square grid")
    return side
