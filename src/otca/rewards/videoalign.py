"""VideoAlign / VideoReward (Liu et al. 2025, "Improving Video Generation with Human Feedback"); registers
``videoalign``, a reward with three objectives: ``[B, 3]`` scores, columns ``videoalign/vq``, ``videoalign/mq``
and ``videoalign/ta`` (``options.columns`` keeps a subset), all from one model run.

VideoReward is Qwen2-VL-2B-Instruct with a bias-free reward head ``rm_head: Linear(hidden, output_dim)``; the
prompt template carries three special tokens ``<|VQ_reward|> <|MQ_reward|> <|TA_reward|>`` and the head's
outputs at those positions are the raw visual-quality, motion-quality and text-alignment scores, then
z-normalized with ``inference_config`` of model_config.json (KwaiVGI/VideoAlign inference.py ``_norm``).

What is reproduced, and from where (KwaiVGI/VideoAlign at 219ab9d):
  * frames and patches (vision_process.py): :mod:`otca.rewards.qwen2vl_frames`, with data_config.fps (or
    data_config.num_frames) and at most data_config.max_frame_pixels pixels;
  * Qwen2-VL patches (the image processor of the base model: rescale 1/255, CLIP statistics, temporal patch
    2, patch 14, 2x2 merge) and ``<|video_pad|>`` expanded to one token per merged patch;
  * the chat template of the local tokenizer, the three special tokens appended to its vocabulary;
  * the forward of trainer.py ``Qwen2VLRewardModelBT``: video features scattered into the token embeddings
    and the decoder called **without position ids**. Under transformers 4.45, which VideoAlign pins, that
    means sequential positions on all three M-RoPE axes, not Qwen2-VL's 3D video positions; the reward
    head was trained that way, so we call the text decoder the same way;
  * checkpoints as utils.py ``load_model_from_checkpoint`` reads them: :mod:`otca.rewards.videoalign_checkpoint`.

``options.tiny: true`` builds a random tiny Qwen2-VL reward model in-process (:mod:`otca.testing.rewards`):
a test/demo twin with VideoAlign's whole input pipeline and forward, whose scores mean nothing.

Known differences: the reference reads an mp4 file, so its frames went through video compression; we score
the decoded frames directly (quantized to uint8 levels as a decoder would give them). The prompt template
(``DETAILED_PROMPT_WITH_SPECIAL_TOKEN`` in VideoAlign's prompt_template.py) is third-party text we do not
ship: point ``prompt_template_path`` at a file holding it verbatim.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from otca.rewards.loading import option_hint, require_dir, require_file, tiny_backbone, torch_dtype, transformers_module
from otca.rewards.options import RewardOptions
from otca.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, check_videos, normalize
from otca.rewards.qwen2vl_frames import (
    VIDEO_MIN_PIXELS,
    frame_indices,
    patchify,
    resize_frames,
    smart_nframes,
    smart_resize,
)
from otca.rewards.registry import register_reward
from otca.rewards.videoalign_checkpoint import (
    DIMS,
    VideoAlignSpec,
    apply_reward_state,
    checkpoint_dir,
    load_reward_state,
    read_spec,
)

NAME = "videoalign"
SPECIAL_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
VIDEO_TOKEN = "<|video_pad|>"
_PROMPT_FIELD = "{text_prompt}"
# The tiny twin's reward prompt: written for otca, not VideoAlign's; it carries what the scorer needs:
# {text_prompt} and the three reward tokens in order.
_TINY_TEMPLATE = "Prompt: {text_prompt}. Visual quality <|VQ_reward|> motion <|MQ_reward|> alignment <|TA_reward|>"

Dim = Literal["VQ", "MQ", "TA"]


def column_name(dim: str) -> str:
    """The score column of one VideoReward objective: ``videoalign/vq`` ..."""
    return f"{NAME}/{dim.lower()}"


class VideoAlignScorer:
    """``(videos [B, 3, F, H, W] in [0, 1], prompts) -> [B, k]`` float32: the ``columns`` of (VQ, MQ, TA),
    z-normalized when ``use_norm`` (the config's inference_config), one model run per chunk of ``batch_size``.
    ``names`` are the columns' names (:func:`column_name`)."""

    def __init__(self, name, model, head, tokenizer, template: str, spec: VideoAlignSpec, proc: dict,
                 source_fps: float, batch_size: int, use_norm: bool, columns: Sequence[str] = DIMS):
        self.name, self.model, self.tokenizer, self.template, self.spec = name, model, tokenizer, template, spec
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.head = head.to(self.device, self.dtype)  # [output_dim, hidden]
        self.proc, self.source_fps = proc, source_fps
        self.batch_size = batch_size
        self.use_norm = use_norm
        self.columns = [DIMS.index(d) for d in columns]
        self.names = tuple(column_name(d) for d in columns)
        self.video_token_id = model.config.video_token_id
        self.special_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)), device=self.device)

    def prepare(self, videos: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Model inputs of one chunk: input_ids, attention_mask [b, L], pixel_values_videos [N, D], grids [b, 3]."""
        _, _, total, h, w = videos.shape
        n = smart_nframes(total, self.source_fps, self.spec.fps, self.spec.num_frames)
        idx = frame_indices(total, n)
        factor = self.proc["patch_size"] * self.proc["merge_size"]
        size = smart_resize(h, w, factor, VIDEO_MIN_PIXELS, self.spec.max_pixels)
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
            texts.append(text.replace(VIDEO_TOKEN, VIDEO_TOKEN * n_tokens, 1))
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
    def __call__(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        x, n = check_videos(self.name, pixels, prompts), self.batch_size
        raw = torch.cat([self.forward(self.prepare(x[i : i + n].to(self.device), prompts[i : i + n]))
                         for i in range(0, x.shape[0], n)]).cpu()  # [B, 3]
        if self.use_norm:
            raw = (raw - torch.tensor(self.spec.mean)) / torch.tensor(self.spec.std)  # [B, 3]
        out = raw[:, self.columns]  # [B, k]
        return out[:, 0] if out.shape[1] == 1 else out


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


def load_videoalign_scorer(root: Path, base: Path, template_file: Path, tok_dir: Path, checkpoint_step: int | None,
                           source_fps: float, device: str, dtype: torch.dtype, batch_size: int, use_norm: bool,
                           columns: Sequence[str]) -> VideoAlignScorer:
    """The VideoReward model, loaded from checked paths."""
    name = NAME
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
    if tokenizer.convert_tokens_to_ids(VIDEO_TOKEN) != model.config.video_token_id:
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
    return VideoAlignScorer(name, model, head, tokenizer, template, spec, proc, source_fps, batch_size, use_norm,
                            columns)


def tiny_videoalign_scorer(seed: int, source_fps: float, device: str, dtype: torch.dtype, batch_size: int,
                           columns: Sequence[str]) -> VideoAlignScorer:
    """The test/demo twin behind ``options.tiny``: a random tiny Qwen2-VL with a random 3-output reward head
    (:func:`otca.testing.rewards.tiny_qwen2vl_reward`), raw (unnormalized) scores. Its scores mean nothing."""
    from otca.testing.rewards import tiny_qwen2vl_reward

    model, head, tok = tiny_qwen2vl_reward(seed, device, dtype, SPECIAL_TOKENS)
    spec = VideoAlignSpec(fps=2.0, num_frames=None, max_pixels=240 * 320, output_dim=len(DIMS), lora_scale=None,
                          mean=None, std=None)
    proc = {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "image_mean": OPENAI_CLIP_MEAN,
            "image_std": OPENAI_CLIP_STD}
    return VideoAlignScorer(NAME, model, head, tok, _TINY_TEMPLATE, spec, proc, source_fps, batch_size, False,
                            columns)


class VideoAlignOptions(RewardOptions):
    unused = ("frames",)  # a video model: it scores the video, not its frames one by one

    path: str | None = None
    """The VideoReward directory (model_config.json + checkpoint-<step>/)."""
    base_path: str | None = None
    """A local Qwen2-VL-2B-Instruct directory (weights, tokenizer, preprocessor_config.json)."""
    prompt_template_path: str | None = None
    """A text file holding VideoAlign's DETAILED_PROMPT_WITH_SPECIAL_TOKEN verbatim (not shipped)."""
    tokenizer_path: str | None = None
    """Where the tokenizer is read instead of ``base_path``."""
    checkpoint_step: int | None = Field(default=None, ge=0)
    """Which checkpoint-<step> to load (default: the latest)."""
    source_fps: float = Field(default=16.0, gt=0)
    """Frame rate of the generated videos (Wan 2.1: 16), used to sample 2 fps like the reference."""
    normalize: bool = True
    """z-normalize each score with the model config's inference_config (unused by the tiny twin: raw scores)."""
    columns: list[Dim] = Field(default=["VQ", "MQ", "TA"], min_length=1)
    """Which objectives to return, in this order: VQ (visual quality), MQ (motion quality), TA (text
    alignment); each is one score column."""
    batch_size: int = Field(default=2, ge=1)
    """Videos scored per forward pass."""


@register_reward(NAME, VideoAlignOptions)
def videoalign(o: VideoAlignOptions) -> VideoAlignScorer:
    """VideoReward's VQ, MQ and TA scores ``[B, 3]`` (z-normalized by default) from one model run. The
    reference runs in bfloat16 on GPU (``dtype='bfloat16'``). ``tiny``: a random tiny reward model built
    in-process (seeded; a test/demo twin, raw scores that mean nothing; no paths)."""
    if len(set(o.columns)) != len(o.columns):
        raise ValueError(f"reward '{NAME}': options.columns {o.columns} repeats an objective")
    paths = dict(path=o.path, base_path=o.base_path, prompt_template_path=o.prompt_template_path,
                 tokenizer_path=o.tokenizer_path)
    device, dtype = str(torch.device(o.device)), torch_dtype(NAME, o.dtype)
    if tiny_backbone(NAME, o.tiny, **paths):
        return tiny_videoalign_scorer(o.seed, o.source_fps, device, dtype, o.batch_size, o.columns)
    root = require_dir(NAME, o.path, "path", "VideoReward directory", needs=("model_config.json",))
    base = require_dir(NAME, o.base_path, "base_path", "Qwen2-VL base directory",
                       needs=("config.json", "preprocessor_config.json"))
    tok_dir = require_dir(NAME, o.tokenizer_path, "tokenizer_path", "tokenizer directory") if o.tokenizer_path else base
    template = require_file(NAME, o.prompt_template_path, "prompt_template_path", "prompt template file")
    return load_videoalign_scorer(root, base, template, tok_dir, o.checkpoint_step, o.source_fps, device, dtype,
                                  o.batch_size, o.normalize, o.columns)
