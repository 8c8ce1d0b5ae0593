"""CLIP image-text similarity rewards on transformers' ``CLIPModel``; registers ``clip-t``.

``clip-t`` is the raw cosine ``cos(E_img(x), E_txt(p))`` of the projected, L2-normalized embeddings, without
the logit scale: the convention of DanceGRPO and the OTCA paper (Table 1 reports 0.268 for FLUX). 100x this
is torchmetrics' CLIPScore before its clamp at 0. The paper does not name its CLIP; we expect
``openai/clip-vit-large-patch14`` (a local snapshot directory), but any transformers CLIP directory works.

The pieces here (:class:`ClipSimilarity`, the model/tokenizer loaders, the embedding functions, the tiny random
CLIP of ``options.tiny``, :mod:`otca.testing.rewards`) are shared by PickScore, HPSv2.1 and the LAION aesthetic reward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import torch

from otca.rewards.heads import l2_normalize
from otca.rewards.loading import option_hint, require_dir, tiny_backbone, torch_dtype, transformers_module
from otca.rewards.options import RewardOptions
from otca.rewards.preprocess import CropPrep, crop_prep_from_processor
from otca.rewards.registry import register_reward
from otca.rewards.scorer import ImageModelReward, per_frame

# A byte-level BPE has at least the 256 byte symbols; fewer means the vocabulary files were not read
# (transformers 5 ``CLIPTokenizer(vocab_file=...)`` silently builds a 3-token toy vocabulary).
_MIN_BPE_VOCAB = 256


@lru_cache(maxsize=4)
def _cached_clip(directory: str, device: str, dtype: torch.dtype):
    """One CLIPModel per (directory, device, dtype): clip-t and laion-aesthetic share the ViT-L/14 backbone."""
    tf = transformers_module()
    model, info = tf.CLIPModel.from_pretrained(
        directory, local_files_only=True, dtype=dtype, output_loading_info=True
    )
    if info["missing_keys"] or info["mismatched_keys"]:
        bad = sorted(info["missing_keys"]) + [m[0] for m in info["mismatched_keys"]]
        raise ValueError(f"CLIP weights in '{directory}' do not fit its config: {bad[:5]} ({len(bad)} in all)")
    return model.to(device).eval().requires_grad_(False)


def load_clip_model(reward: str, directory: str | Path | None, option: str, device: str, dtype: torch.dtype):
    """A transformers ``CLIPModel`` from a local directory (config.json + weights), eval mode, no grad."""
    d = require_dir(reward, directory, option, "CLIP model directory", needs=("config.json",))
    return _cached_clip(str(d.resolve()), str(torch.device(device)), dtype)


def load_clip_tokenizer(reward: str, directory: str | Path | None, option: str):
    """The CLIP BPE tokenizer of a local directory (tokenizer.json, or vocab.json + merges.txt)."""
    d = require_dir(reward, directory, option, "tokenizer directory")
    if not (d / "tokenizer.json").is_file() and not ((d / "vocab.json").is_file() and (d / "merges.txt").is_file()):
        raise FileNotFoundError(
            f"reward '{reward}': '{d}' has neither tokenizer.json nor vocab.json + merges.txt "
            + option_hint(reward, option)
        )
    tok = transformers_module().CLIPTokenizer.from_pretrained(str(d), local_files_only=True)
    if len(tok) < _MIN_BPE_VOCAB:
        raise ValueError(f"reward '{reward}': tokenizer in '{d}' has {len(tok)} tokens, expected a CLIP BPE vocabulary")
    return tok


def image_embeds(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Unit-norm projected image embeddings ``[B, D]`` (fp32) of preprocessed ``[B, 3, S, S]`` pixels."""
    out = model.get_image_features(pixel_values=pixel_values)
    return l2_normalize(getattr(out, "pooler_output", out))  # transformers 5 returns an output object


def text_embeds(model, tokenizer, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
    """Unit-norm projected text embeddings ``[B, D]`` (fp32); truncation at the model's context (77).

    Padding does not change a prompt's embedding: the causal mask keeps pads out of the pooled EOT state.
    """
    max_len = model.config.text_config.max_position_embeddings
    t = tokenizer(list(prompts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    out = model.get_text_features(input_ids=t["input_ids"].to(device), attention_mask=t["attention_mask"].to(device))
    return l2_normalize(getattr(out, "pooler_output", out))


class ClipSimilarity(ImageModelReward):
    """``score_i = scale * cos(E_img(prep(x_i)), E_txt(p_i))`` -> ``[B]`` float32 on CPU.

    ``scale`` is 1 for CLIP-T and HPS (raw cosine), ``exp(logit_scale)`` for PickScore. Runs in eval mode
    without gradients, ``batch_size`` samples at a time (:class:`ImageModelReward`).
    """

    def __init__(
        self,
        name: str,
        model,
        tokenizer,
        prep: Callable[[torch.Tensor], torch.Tensor],
        scale: float,
        batch_size: int,
    ):
        super().__init__(name, model, prep, batch_size)
        self.model = model
        self.tokenizer = tokenizer
        self.scale = float(scale)

    def score(self, x: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        img = image_embeds(self.model, x)  # [b, D]
        txt = text_embeds(self.model, self.tokenizer, prompts, self.device)  # [b, D]
        return self.scale * (img * txt).sum(-1)  # [b]


class ClipOptions(RewardOptions):
    path: str | None = None
    """A local transformers CLIP directory: config.json, weights, tokenizer files, preprocessor_config.json."""
    processor_path: str | None = None
    """Where the tokenizer and preprocessor_config.json are read from instead (default: ``path``)."""


def hf_clip_similarity(name: str, use_logit_scale: bool, o: ClipOptions) -> ClipSimilarity:
    """A :class:`ClipSimilarity` on a transformers CLIP directory; tokenizer and preprocessing are read from
    ``processor_path`` (default: ``path``). With ``tiny``: on the tiny random CLIP (seeded) and CLIP's
    resize-and-crop preprocessing at its 32 px, no paths."""
    dtype = torch_dtype(name, o.dtype)
    if tiny_backbone(name, o.tiny, path=o.path, processor_path=o.processor_path):
        from otca.testing.rewards import TINY_CLIP_SIDE, tiny_clip

        model, tokenizer = tiny_clip(o.seed, "quick_gelu", str(torch.device(o.device)), dtype)
        prep = CropPrep(shortest_edge=TINY_CLIP_SIDE, crop=(TINY_CLIP_SIDE, TINY_CLIP_SIDE))
    else:
        model = load_clip_model(name, o.path, "path", o.device, dtype)
        proc_option = "processor_path" if o.processor_path else "path"
        proc_dir = o.processor_path or o.path
        tokenizer = load_clip_tokenizer(name, proc_dir, proc_option)
        prep = crop_prep_from_processor(name, proc_dir, proc_option)
    scale = float(model.logit_scale.exp()) if use_logit_scale else 1.0
    return ClipSimilarity(name, model, tokenizer, prep, scale, o.batch_size)


def register_clip_similarity(name: str, use_logit_scale: bool, doc: str) -> None:
    """Register the :func:`hf_clip_similarity` reward ``name`` (options :class:`ClipOptions`, documented by
    ``doc``); ``frames`` wraps it in :class:`~otca.rewards.scorer.FrameMean`."""

    def build(o: ClipOptions):
        return per_frame(hf_clip_similarity(name, use_logit_scale, o), o.frames)

    build.__doc__ = doc
    register_reward(name, ClipOptions)(build)


register_clip_similarity(
    "clip-t",
    use_logit_scale=False,
    doc="""CLIP-T: raw cosine similarity of image and prompt (about 0.2-0.35 for a strong CLIP).

    ``path``: a local transformers CLIP directory (e.g. a snapshot of openai/clip-vit-large-patch14) with
    config.json, weights, tokenizer files and preprocessor_config.json; ``processor_path`` overrides where
    the tokenizer and preprocessor files are read from. ``tiny``: a random tiny CLIP built in-process
    (seeded by ``seed``; a test/demo twin, its scores mean nothing). ``frames``: also score videos, as the mean
    over frames (CLIPSIM).
    """,
)
