"""VideoAlign / VideoReward (Liu et al. 2025, "Improving Video Generation with Human Feedback"); registers
``videoalign-vq``, ``videoalign-mq`` and ``videoalign-ta``.

VideoReward is Qwen2-VL-2B-Instruct with a bias-free reward head ``rm_head: Linear(hidden, output_dim)``; the
prompt template carries three special tokens ``<|VQ_reward|> <|MQ_reward|> <|TA_reward|>`` and the head's
outputs at those positions are the raw visual-quality, motion-quality and text-alignment scores, then
z-normalized with ``inference_config`` of model_config.json (KwaiVGI/VideoAlign inference.py ``_norm``).

What is reproduced, and from where (KwaiVGI/VideoAlign at 219ab9d):
  * frames (vision_process.py ``fetch_video`` / ``smart_nframes`` / ``smart_resize``): ``nframes`` from the
    video length, its fps and data_config.fps (or data_config.num_frames), uniform ``linspace(...).round()``
    indices, bicubic antialiased resize of uint8 frames to multiples of 28 with at least 128*28*28 and at
    most data_config.max_frame_pixels pixels;
  * Qwen2-VL patches (the image processor of the base model: rescale 1/255, CLIP statistics, temporal patch
    2, patch 14, 2x2 merge) and ``<|video_pad|>`` expanded to one token per merged patch;
  * the chat template of the local tokenizer, the three special tokens appended to its vocabulary;
  * the forward of trainer.py ``Qwen2VLRewardModelBT``: video features scattered into the token embeddings
    and the decoder called **without position ids**. Under transformers 4.45, which VideoAlign pins, that
    means sequential positions on all three M-RoPE axes, not Qwen2-VL's 3D video positions; the reward
    head was trained that way, so we call the text decoder the same way;
  * checkpoints as utils.py ``load_model_from_checkpoint`` reads them: ``checkpoint-N/model.pth`` (full,
    possibly PEFT-wrapped state dict) or ``adapter_model.safetensors`` + ``non_lora_state_dict.pth``; LoRA
    deltas are merged as ``W + (alpha / r) B A`` (``alpha / sqrt(r)`` with rsLoRA).

``options.tiny: true`` builds a random tiny Qwen2-VL reward model in-process (:func:`tiny_videoalign_scorer`):
a test/demo twin with VideoAlign's whole input pipeline and forward, whose scores mean nothing.

Known differences: the reference reads an mp4 file, so its frames went through video compression; we score
the decoded frames directly (quantized to uint8 levels as a decoder would give them). The prompt template
(``DETAILED_PROMPT_WITH_SPECIAL_TOKEN`` in VideoAlign's prompt_template.py) is third-party text we do not
ship: point ``prompt_template_path`` at a file holding it verbatim.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from otca.rewards.loading import (
    load_checkpoint,
    option_hint,
    positive_int,
    require_dir,
    require_file,
    seeded,
    tensor_dict,
    tiny_backbone,
    torch_dtype,
    transformers_module,
)
from otca.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, check_videos, normalize
from otca.rewards.registry import register_reward

DIMS = ("VQ", "MQ", "TA")
SPECIAL_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
_VIDEO_TOKEN = "<|video_pad|>"
_PROMPT_FIELD = "{text_prompt}"
# vision_process.py constants that model_config.json does not carry.
_VIDEO_MIN_PIXELS = 128 * 28 * 28
_FRAME_FACTOR = 2
_FPS_MIN_FRAMES = 4
_FPS_MAX_FRAMES = 768
_MAX_RATIO = 200


# ------------------------------------------------------------------------------------------- frames and patches


def round_by_factor(x: float, factor: int) -> int:
    return round(x / factor) * factor


def ceil_by_factor(x: float, factor: int) -> int:
    return math.ceil(x / factor) * factor


def floor_by_factor(x: float, factor: int) -> int:
    return math.floor(x / factor) * factor


def smart_resize(h: int, w: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Frame size with both sides multiples of ``factor`` and area in [min_pixels, max_pixels], aspect kept
    as well as possible (vision_process.py ``smart_resize``)."""
    if max(h, w) / min(h, w) > _MAX_RATIO:
        raise ValueError(f"videoalign: aspect ratio {max(h, w) / min(h, w):.1f} exceeds {_MAX_RATIO}")
    hb, wb = max(factor, round_by_factor(h, factor)), max(factor, round_by_factor(w, factor))
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = floor_by_factor(h / beta, factor), floor_by_factor(w / beta, factor)
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = ceil_by_factor(h * beta, factor), ceil_by_factor(w * beta, factor)
    return hb, wb


def smart_nframes(total: int, video_fps: float, fps: float | None, num_frames: int | None) -> int:
    """Frames fed to the model (vision_process.py ``smart_nframes``): ``num_frames`` rounded to even, or
    ``total / video_fps * fps`` clamped to [4, min(768, total)] and rounded to even; at most ``total``."""
    if num_frames is not None:
        n = round_by_factor(num_frames, _FRAME_FACTOR)
    else:
        lo = ceil_by_factor(_FPS_MIN_FRAMES, _FRAME_FACTOR)
        hi = floor_by_factor(min(_FPS_MAX_FRAMES, total), _FRAME_FACTOR)
        n = round_by_factor(min(max(total / video_fps * fps, lo), hi), _FRAME_FACTOR)
    n = min(n, total)
    if not _FRAME_FACTOR <= n <= total:
        raise ValueError(f"videoalign: {n} frames to sample from a {total}-frame video, need 2..{total}")
    return n


def frame_indices(total: int, n: int) -> list[int]:
    """Uniform sampling: ``linspace(0, total - 1, n).round()``."""
    return torch.linspace(0, total - 1, n).round().long().tolist()


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[T, 3, H, W]`` in [0, 1] -> ``[T, 3, *size]`` in [0, 1] on uint8 levels.

    The reference decodes uint8 frames and resizes them with torchvision (bicubic, antialias), which
    computes in float and rounds back to uint8: both roundings are kept.
    """
    x = (frames * 255).round()
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).round().clamp(0, 255)
    return x / 255


def patchify(frames: torch.Tensor, temporal: int, patch: int, merge: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Qwen2-VL patches of normalized frames ``[T, C, H, W]`` -> ``([gt*gh*gw, C*temporal*patch*patch],
    (gt, gh, gw))``; the last frame is repeated up to a multiple of ``temporal``, and patches are ordered
    so that each 2x2 merge group is contiguous (transformers' Qwen2-VL image processor layout)."""
    t, c, h, w = frames.shape
    if t % temporal:
        frames = torch.cat([frames, frames[-1:].expand(temporal - t % temporal, -1, -1, -1)])
    gt, gh, gw = frames.shape[0] // temporal, h // patch, w // patch
    x = frames.reshape(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [gt, gh/m, gw/m, m, m, C, temporal, p, p]
    return x.reshape(gt * gh * gw, c * temporal * patch * patch), (gt, gh, gw)


# ------------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class VideoAlignSpec:
    """What model_config.json fixes: frame sampling, head width, LoRA scale, normalization."""

    fps: float | None
    num_frames: int | None
    max_pixels: int
    output_dim: int
    lora_scale: float | None
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None


def read_spec(reward: str, path: Path) -> VideoAlignSpec:
    """Parse VideoAlign's model_config.json; settings this port does not reproduce are errors."""
    cfg = json.loads(path.read_text())
    data, model, lora = cfg.get("data_config", {}), cfg.get("model_config", {}), cfg.get("peft_lora_config", {})
    expect = {
        ("data_config", "sample_type"): (data.get("sample_type", "uniform"), "uniform"),
        ("data_config", "prompt_template_type"): (data.get("prompt_template_type"), "detailed_special"),
        ("model_config", "use_special_tokens"): (model.get("use_special_tokens"), True),
        ("model_config", "reward_token"): (model.get("reward_token", "special"), "special"),
    }
    for (section, key), (got, want) in expect.items():
        if got != want:
            raise ValueError(f"reward '{reward}': '{path}' {section}.{key}={got!r}, only {want!r} is supported")
    scale = None
    if lora.get("lora_enable"):
        r, alpha = lora.get("lora_r", 16), lora.get("lora_alpha", 32)  # VideoAlign PEFTLoraConfig defaults
        scale = alpha / math.sqrt(r) if lora.get("use_rslora") else alpha / r
    inf = cfg.get("inference_config")
    mean = tuple(float(inf[f"{d}_mean"]) for d in DIMS) if inf else None
    std = tuple(float(inf[f"{d}_std"]) for d in DIMS) if inf else None
    return VideoAlignSpec(
        fps=None if data.get("num_frames") is not None else float(data.get("fps", 2.0)),
        num_frames=data.get("num_frames"),
        max_pixels=int(data.get("max_frame_pixels", 240 * 320)),  # VideoAlign DataConfig defaults
        output_dim=int(model.get("output_dim", 1)),
        lora_scale=scale,
        mean=mean,
        std=std,
    )


def checkpoint_dir(reward: str, root: Path, step: int | None) -> Path:
    """``root/checkpoint-<step>``, the latest one when ``step`` is None (as VideoAlign picks it)."""
    found = {int(p.name.split("-")[-1]): p for p in root.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()}
    if not found:
        raise FileNotFoundError(f"reward '{reward}': no checkpoint-<step> directory in '{root}' "
                                + option_hint(reward, "path"))
    if step is None:
        return found[max(found)]
    if step not in found:
        raise FileNotFoundError(f"reward '{reward}': '{root / f'checkpoint-{step}'}' not found, have steps "
                                f"{sorted(found)} " + option_hint(reward, "checkpoint_step"))
    return found[step]


def load_reward_state(reward: str, ckpt: Path) -> dict[str, torch.Tensor]:
    """The trained tensors of a VideoAlign checkpoint directory, keys with PEFT's wrappers removed:
    ``base_model.model.`` prefix, ``.base_layer`` and the ``.default`` adapter name."""
    full = ckpt / "model.pth"
    if full.is_file():
        raw = tensor_dict(reward, full, load_checkpoint(reward, full))
    else:
        adapter = require_file(reward, ckpt / "adapter_model.safetensors", "path", "LoRA adapter file")
        rest = require_file(reward, ckpt / "non_lora_state_dict.pth", "path", "non-LoRA weights file")
        raw = {**tensor_dict(reward, rest, load_checkpoint(reward, rest)),
               **tensor_dict(reward, adapter, load_checkpoint(reward, adapter))}
    out = {}
    for key, value in raw.items():
        k = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        out[k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")] = value
    return out


# transformers 4.45 (VideoAlign's pin) named the decoder ``model.*`` and the vision tower ``visual.*``;
# transformers 5 nests both under ``model``. First match wins.
_LAYOUT = (
    ("model.language_model.", "model.language_model."),
    ("model.visual.", "model.visual."),
    ("visual.", "model.visual."),
    ("model.", "model.language_model."),
)


def current_name(key: str) -> str | None:
    for old, new in _LAYOUT:
        if key.startswith(old):
            return new + key[len(old) :]
    return None


@torch.no_grad()
def apply_reward_state(reward: str, model, state: dict[str, torch.Tensor], lora_scale: float | None) -> torch.Tensor:
    """Write a normalized VideoAlign state dict into a transformers-5 ``Qwen2VLForConditionalGeneration``
    (full tensors first, then merged LoRA deltas) and return the reward head weight ``[output_dim, hidden]``.

    ``lm_head`` is skipped: it is tied to the embeddings in Qwen2-VL-2B and unused by the score. Any other
    key the model does not have is an error, as is a shape mismatch.
    """
    params = dict(model.named_parameters())
    head, lora, unknown = None, {}, []
    for key, value in state.items():
        if key == "rm_head.weight":
            head = value
        elif key.startswith("lm_head."):
            continue
        elif ".lora_A." in key or ".lora_B." in key:
            lora[key] = value
        else:
            name = current_name(key)
            if name not in params or params[name].shape != value.shape:
                unknown.append(key)
            else:
                params[name].copy_(value)
    if head is None:
        raise ValueError(f"reward '{reward}': checkpoint has no rm_head.weight")
    for key_a in [k for k in lora if ".lora_A." in k]:
        module = key_a.split(".lora_A.")[0]
        name = current_name(module + ".weight")
        key_b = key_a.replace(".lora_A.", ".lora_B.")
        if lora_scale is None:
            raise ValueError(f"reward '{reward}': checkpoint has LoRA weights but peft_lora_config.lora_enable is off")
        if name not in params or key_b not in lora:
            unknown.append(key_a)
            continue
        delta = lora[key_b].float() @ lora[key_a].float()  # [out, r] @ [r, in]
        params[name].add_((lora_scale * delta).to(params[name].dtype))
    if unknown:
        raise ValueError(f"reward '{reward}': checkpoint keys that fit no Qwen2-VL parameter (name or shape): "
                         f"{unknown[:5]} ({len(unknown)} in all)")
    return head


# ------------------------------------------------------------------------------------------------------ scorer


class VideoAlignScorer:
    """``(videos [B, 3, F, H, W] in [0, 1], prompts) -> [B, 3]`` float32 (VQ, MQ, TA), z-normalized when the
    config has an inference_config. One instance is shared by the three rewards, and the last result is
    reused when the prepared model inputs are identical, so a RewardSet runs the 2B model once per batch."""

    def __init__(self, name, model, head, tokenizer, template: str, spec: VideoAlignSpec, proc: dict,
                 source_fps: float, batch_size: int, use_norm: bool):
        self.name, self.model, self.tokenizer, self.template, self.spec = name, model, tokenizer, template, spec
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.head = head.to(self.device, self.dtype)  # [output_dim, hidden]
        self.proc, self.source_fps = proc, source_fps
        self.batch_size = positive_int(name, "batch_size", batch_size)
        self.use_norm = use_norm
        self.video_token_id = model.config.video_token_id
        self.special_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)), device=self.device)
        self._memo: tuple[list[dict], torch.Tensor] | None = None

    def prepare(self, videos: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Model inputs of one chunk: input_ids, attention_mask [b, L], pixel_values_videos [N, D], grids [b, 3]."""
        _, _, total, h, w = videos.shape
        n = smart_nframes(total, self.source_fps, self.spec.fps, self.spec.num_frames)
        idx = frame_indices(total, n)
        factor = self.proc["patch_size"] * self.proc["merge_size"]
        size = smart_resize(h, w, factor, _VIDEO_MIN_PIXELS, self.spec.max_pixels)
        patches, grids, texts = [], [], []
        for video, prompt in zip(videos, prompts, strict=True):
            frames = resize_frames(video[:, idx].transpose(0, 1), size)  # [n, 3, h', w']
            x, grid = patchify(normalize(frames, self.proc["image_mean"], self.proc["image_std"]),
                               self.proc["temporal_patch_size"], self.proc["patch_size"], self.proc["merge_size"])
            patches.append(x)
            grids.append(grid)
            n_tokens = grid[0] * grid[1] * grid[2] // self.proc["merge_size"] ** 2
            question = self.template.replace(_PROMPT_FIELD, prompt)
            chat = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
            text = self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            texts.append(text.replace(_VIDEO_TOKEN, _VIDEO_TOKEN * n_tokens, 1))
        enc = self.tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
        return {
            "input_ids": enc["input_ids"].to(self.device),
            "attention_mask": enc["attention_mask"].to(self.device),
            "pixel_values_videos": torch.cat(patches).to(self.device, self.dtype),
            "video_grid_thw": torch.tensor(grids, device=self.device),
        }

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Raw (VQ, MQ, TA) ``[b, 3]`` of prepared inputs (trainer.py ``Qwen2VLRewardModelBT.forward``)."""
        ids = inputs["input_ids"]  # [b, L]
        vlm = self.model.model
        emb = vlm.get_input_embeddings()(ids)  # [b, L, D]
        feats = vlm.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"], return_dict=True)
        video = torch.cat(feats.pooler_output).to(emb.dtype)  # [n_video_tokens, D]
        slots = (ids == self.video_token_id).unsqueeze(-1)  # [b, L, 1]
        if int(slots.sum()) != video.shape[0]:
            raise RuntimeError(f"reward '{self.name}': {int(slots.sum())} video tokens for {video.shape[0]} features")
        emb = emb.masked_scatter(slots.expand_as(emb), video)
        # no position_ids: sequential positions on every M-RoPE axis, as VideoAlign trained (module docstring)
        hidden = vlm.language_model(inputs_embeds=emb, attention_mask=inputs["attention_mask"], use_cache=False)
        logits = hidden.last_hidden_state @ self.head.T  # [b, L, output_dim]
        marks = torch.isin(ids, self.special_ids)  # [b, L]
        if not bool((marks.sum(1) == len(SPECIAL_TOKENS)).all()):
            raise ValueError(f"reward '{self.name}': a prompt lost or repeats a reward token "
                             f"({marks.sum(1).tolist()} found, expected 3 each)")
        picked = logits[marks].view(ids.shape[0], len(SPECIAL_TOKENS), -1)  # [b, 3, output_dim], sequence order
        if picked.shape[-1] == len(SPECIAL_TOKENS):  # one output per token type: take the matching one
            return picked.diagonal(dim1=1, dim2=2).float()
        return picked.reshape(ids.shape[0], -1).float()  # output_dim 1: [b, 3]

    @torch.no_grad()
    def __call__(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        x = check_videos(self.name, videos, prompts)
        chunks = [self.prepare(x[i : i + self.batch_size].to(self.device), prompts[i : i + self.batch_size])
                  for i in range(0, x.shape[0], self.batch_size)]
        if self._memo is not None and _same_inputs(self._memo[0], chunks):
            return self._memo[1]
        raw = torch.cat([self.forward(c) for c in chunks]).cpu()  # [B, 3]
        out = (raw - torch.tensor(self.spec.mean)) / torch.tensor(self.spec.std) if self.use_norm else raw
        self._memo = (chunks, out)
        return out


def _same_inputs(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(x[k].shape == y[k].shape and torch.equal(x[k], y[k]) for k in x)
        for x, y in zip(a, b, strict=True)
    )


def _chat_template(reward: str, tokenizer, directory: Path) -> None:
    """Make sure the tokenizer has Qwen2-VL's chat template (tokenizer_config.json, chat_template.jinja, or
    the processor's chat_template.json)."""
    if tokenizer.chat_template:
        return
    proc = directory / "chat_template.json"
    if not proc.is_file():
        raise FileNotFoundError(f"reward '{reward}': no chat template in '{directory}' "
                                + option_hint(reward, "tokenizer_path"))
    tokenizer.chat_template = json.loads(proc.read_text())["chat_template"]


def _read_template(reward: str, path: Path) -> str:
    text = path.read_text()
    marks = [text.find(t) for t in SPECIAL_TOKENS]
    if text.count(_PROMPT_FIELD) != 1 or any(text.count(t) != 1 for t in SPECIAL_TOKENS) or marks != sorted(marks):
        raise ValueError(f"reward '{reward}': '{path}' must hold {_PROMPT_FIELD} once and "
                         f"{', '.join(SPECIAL_TOKENS)} once each, in that order")
    return text


@lru_cache(maxsize=2)
def shared_scorer(root: Path, base: Path, template_file: Path, tok_dir: Path, checkpoint_step: int | None,
                  source_fps: float, device: str, dtype: torch.dtype, batch_size: int,
                  use_norm: bool) -> VideoAlignScorer:
    """The one loaded VideoReward model behind the three rewards (cached per option set); the paths were
    checked by the factory."""
    name = "videoalign"
    tf = transformers_module()
    spec = read_spec(name, root / "model_config.json")
    if use_norm and spec.mean is None:
        raise ValueError(f"reward '{name}': '{root / 'model_config.json'}' has no inference_config to normalize "
                         f"with (set options.normalize=false for raw scores)")
    proc = json.loads((base / "preprocessor_config.json").read_text())
    proc = {"patch_size": proc.get("patch_size", 14), "temporal_patch_size": proc.get("temporal_patch_size", 2),
            "merge_size": proc.get("merge_size", 2), "image_mean": proc["image_mean"], "image_std": proc["image_std"]}
    tokenizer = tf.AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})  # as VideoAlign does
    _chat_template(name, tokenizer, tok_dir)
    template = _read_template(name, template_file)
    # fp32 while the checkpoint and the LoRA deltas are merged in, then cast once
    model = tf.Qwen2VLForConditionalGeneration.from_pretrained(
        str(base), local_files_only=True, dtype=torch.float32, attn_implementation="sdpa"
    )
    if tokenizer.convert_tokens_to_ids(_VIDEO_TOKEN) != model.config.video_token_id:
        raise ValueError(f"reward '{name}': tokenizer in '{tok_dir}' does not match the model's video token")
    state = load_reward_state(name, checkpoint_dir(name, root, checkpoint_step))
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows and not any(k.endswith("embed_tokens.weight") for k in state):
        raise ValueError(f"reward '{name}': the reward tokens need {len(tokenizer)} embedding rows, the base has "
                         f"{rows} and the checkpoint brings none")
    model.resize_token_embeddings(len(tokenizer))  # VideoAlign resizes to the tokenizer before loading
    head = apply_reward_state(name, model, state, spec.lora_scale)
    if head.shape[0] != spec.output_dim:
        raise ValueError(f"reward '{name}': rm_head has {head.shape[0]} outputs, model_config says {spec.output_dim}")
    model = model.to(device, dtype).eval().requires_grad_(False)
    return VideoAlignScorer(name, model, head, tokenizer, template, spec, proc, source_fps, batch_size, use_norm)


# The tiny twin's chat template and reward prompt: written for otca (Qwen2-VL's turn markup, one video then the
# text), not VideoAlign's; they carry what the scorer needs: one video slot, {text_prompt}, the three tokens.
_TINY_CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == 'video' %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_TINY_TEMPLATE = "Prompt: {text_prompt}. Visual quality <|VQ_reward|> motion <|MQ_reward|> alignment <|TA_reward|>"
_TINY_MARKUP = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", _VIDEO_TOKEN)


@lru_cache(maxsize=2)
def tiny_videoalign_scorer(seed: int, source_fps: float, device: str, dtype: torch.dtype,
                           batch_size: int) -> VideoAlignScorer:
    """The test/demo twin behind ``options.tiny``: a random Qwen2-VL (2 decoder layers of width 32, a 2-block
    vision tower with 14 px patches, 2x2 merge, temporal patch 2) with a random 3-output reward head, a
    byte-level BPE with the reward tokens, raw (unnormalized) scores. Its scores mean nothing."""
    from otca.models._diffusers_common import byte_alphabet

    tf = transformers_module()
    tok = tf.Qwen2Tokenizer(vocab={s: i for i, s in enumerate(byte_alphabet())}, merges=[])
    tok.add_special_tokens({"additional_special_tokens": [*_TINY_MARKUP, *SPECIAL_TOKENS]})
    tok.chat_template = _TINY_CHAT
    video, start, end, stop = tok.convert_tokens_to_ids([_VIDEO_TOKEN, "<|vision_start|>", "<|vision_end|>",
                                                         "<|im_end|>"])
    cfg = tf.Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), bos_token_id=stop, eos_token_id=stop, pad_token_id=stop,
                         hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        video_token_id=video, vision_start_token_id=start, vision_end_token_id=end, image_token_id=video,
    )
    model, head = seeded(seed, lambda: (tf.Qwen2VLForConditionalGeneration(cfg), torch.randn(len(DIMS), 32)))
    spec = VideoAlignSpec(fps=2.0, num_frames=None, max_pixels=240 * 320, output_dim=len(DIMS), lora_scale=None,
                          mean=None, std=None)
    proc = {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "image_mean": OPENAI_CLIP_MEAN,
            "image_std": OPENAI_CLIP_STD}
    model = model.to(device, dtype).eval().requires_grad_(False)
    return VideoAlignScorer("videoalign", model, head, tok, _TINY_TEMPLATE, spec, proc, source_fps, batch_size, False)


class VideoAlignReward:
    """One column (VQ, MQ or TA) of the shared scorer: ``[B, 3, F, H, W]`` videos -> ``[B]`` float32."""

    def __init__(self, name: str, scorer: VideoAlignScorer, column: int):
        self.name, self.scorer, self.column = name, scorer, column

    def __call__(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.scorer(pixels, prompts)[:, self.column].contiguous()


def _factory(dim: str):
    column = DIMS.index(dim)

    def build(
        path: str | None = None,
        base_path: str | None = None,
        prompt_template_path: str | None = None,
        tokenizer_path: str | None = None,
        checkpoint_step: int | None = None,
        source_fps: float = 16.0,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 2,
        normalize: bool = True,
        tiny: bool = False,
        seed: int = 0,
    ) -> VideoAlignReward:
        name = f"videoalign-{dim.lower()}"
        paths = dict(path=path, base_path=base_path, prompt_template_path=prompt_template_path,
                     tokenizer_path=tokenizer_path)
        if tiny_backbone(name, tiny, **paths):
            scorer = tiny_videoalign_scorer(seed, float(source_fps), str(torch.device(device)),
                                            torch_dtype(name, dtype), positive_int(name, "batch_size", batch_size))
            return VideoAlignReward(name, scorer, column)
        # paths are checked here, so that errors name the reward the user configured
        root = require_dir(name, path, "path", "VideoReward directory", needs=("model_config.json",))
        base = require_dir(name, base_path, "base_path", "Qwen2-VL base directory",
                           needs=("config.json", "preprocessor_config.json"))
        tok_dir = require_dir(name, tokenizer_path, "tokenizer_path", "tokenizer directory") if tokenizer_path else base
        template = require_file(name, prompt_template_path, "prompt_template_path", "prompt template file")
        scorer = shared_scorer(root.resolve(), base.resolve(), template.resolve(), tok_dir.resolve(), checkpoint_step,
                               float(source_fps), str(torch.device(device)), torch_dtype(name, dtype),
                               positive_int(name, "batch_size", batch_size), bool(normalize))
        return VideoAlignReward(name, scorer, column)

    build.__doc__ = f"""VideoReward {dim} score (z-normalized by default).

    ``path``: the VideoReward directory (model_config.json + checkpoint-<step>/), ``checkpoint_step`` picks
    one (default: the latest). ``base_path``: a local Qwen2-VL-2B-Instruct directory (weights, tokenizer,
    preprocessor_config.json); ``tokenizer_path`` overrides where the tokenizer is read. ``prompt_template_path``:
    a text file with VideoAlign's DETAILED_PROMPT_WITH_SPECIAL_TOKEN verbatim. ``source_fps``: frame rate
    of the generated videos (Wan 2.1: 16), used to sample 2 fps like the reference. The reference runs in
    bfloat16 on GPU (``dtype='bfloat16'``). ``tiny``: a random tiny reward model built in-process, shared by
    the three columns (seeded; a test/demo twin, raw scores that mean nothing; no paths, ``normalize`` unused)."""
    return build


for _dim in DIMS:
    register_reward(f"videoalign-{_dim.lower()}")(_factory(_dim))
