"""HPSv2.1 (Human Preference Score v2.1, Wu et al. 2023); registers ``hpsv2.1``.

HPS is an open_clip ViT-H-14 fine-tuned on human preferences. Its score is the raw cosine of the normalized
image and text features, no logit scale (HPSv2 img_score.py: ``diag(img @ txt.T)``), about 0.25-0.33
(OTCA Table 1: 0.2986 for FLUX). Preprocessing differs from CLIP: the longest side is resized to 224 and the
rest is padded black (``ResizeMaxSize``), there is no center crop.

We do not depend on open_clip (it pulls torchvision, which replaces a CPU torch with a CUDA build): the
checkpoint's open_clip state dict is mapped onto transformers' ``CLIPModel`` (:func:`openclip_to_hf`).
The two compute the same function: pre-LN residual blocks, exact GELU, LayerNorm eps 1e-5, class-token
pooling after ``ln_post``, text pooled at the EOT token (the largest id, which open_clip finds by argmax).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from otca.rewards.clip import ClipSimilarity, load_clip_tokenizer
from otca.rewards.loading import (
    load_checkpoint,
    require_file,
    square_side,
    tensor_dict,
    tiny_backbone,
    torch_dtype,
    transformers_module,
)
from otca.rewards.options import RewardOptions
from otca.rewards.preprocess import LetterboxPrep
from otca.rewards.registry import register_reward
from otca.rewards.scorer import per_frame

# open_clip key -> CLIPModel key, for tensors outside the residual blocks. Layout of open_clip's CLIP /
# VisionTransformer / TextTransformer (hpsv2/src/open_clip/{model,transformer}.py), pairing as in
# transformers' models/clip/convert_clip_original_pytorch_to_hf.py (OpenAI CLIP uses the same names).
_RENAMES = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "logit_scale": "logit_scale",
}
# open_clip multiplies x @ P with P [in, out]; nn.Linear stores [out, in].
_TRANSPOSED = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}
# Residual blocks: tower prefix, then per-block names. attn.in_proj_{weight,bias} is split into q, k, v.
_TOWERS = (
    ("visual.transformer.resblocks.", "vision_model.encoder.layers."),
    ("transformer.resblocks.", "text_model.encoder.layers."),
)
_BLOCK = (
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
    ("attn.out_proj.", "self_attn.out_proj."),
)
# open_clip's causal-mask buffer: not a weight (older checkpoints may carry it); the model rebuilds it.
_DROPPED = {"attn_mask"}


def _block_keys(prefix: str, rest: str, value: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """CLIPModel entries for one residual-block tensor (``rest`` is the name inside the block)."""
    if rest.startswith("attn.in_proj_"):
        kind = rest[len("attn.in_proj_") :]  # weight | bias; rows stacked q, k, v (nn.MultiheadAttention)
        parts = zip("qkv", value.chunk(3, dim=0), strict=True)
        return {f"{prefix}self_attn.{n}_proj.{kind}": part for n, part in parts}
    for src, dst in _BLOCK:
        if rest.startswith(src):
            return {prefix + dst + rest[len(src) :]: value}
    return None


def openclip_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip CLIP state dict (ViT image tower, transformer text tower) as a ``CLIPModel`` state dict.

    Raises ValueError listing any key it does not know, so nothing is silently dropped.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key in _DROPPED:
            continue
        if key in _RENAMES:
            out[_RENAMES[key]] = value
            continue
        if key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
            continue
        mapped = None
        for src, dst in _TOWERS:
            if key.startswith(src):
                idx, rest = key[len(src) :].split(".", 1)
                mapped = _block_keys(f"{dst}{idx}.", rest, value)
                break
        if mapped is None:
            unknown.append(key)
        else:
            out.update(mapped)
    if unknown:
        raise ValueError(f"unknown open_clip keys {unknown[:5]} ({len(unknown)} in all)")
    return out


def _count_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix) :].split(".", 1)[0] for k in state if k.startswith(prefix)})


def openclip_config(reward: str, state: dict[str, torch.Tensor], vision_heads: int, text_heads: int):
    """The ``CLIPConfig`` of an open_clip state dict: sizes from tensor shapes, head counts given
    (they are not recoverable from shapes; ViT-H-14 has 16 and 16)."""
    tf = transformers_module()
    need = ["visual.class_embedding", "visual.conv1.weight", "visual.positional_embedding", "visual.proj",
            "token_embedding.weight", "positional_embedding", "text_projection"]
    missing = [k for k in need if k not in state]
    if missing:
        raise ValueError(f"reward '{reward}': not an open_clip ViT checkpoint, missing {missing}")
    patch = state["visual.conv1.weight"].shape[-1]
    grid = square_side(reward, state["visual.positional_embedding"].shape[0] - 1, "visual.positional_embedding")
    vocab, text_width = state["token_embedding.weight"].shape
    vision: dict[str, Any] = dict(
        hidden_size=state["visual.class_embedding"].shape[0],
        intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=_count_blocks(state, "visual.transformer.resblocks."),
        num_attention_heads=vision_heads,
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",  # ViT-H-14 is not a QuickGELU model
    )
    text: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=text_width,
        intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=_count_blocks(state, "transformer.resblocks."),
        num_attention_heads=text_heads,
        max_position_embeddings=state["positional_embedding"].shape[0],
        hidden_act="gelu",
        # eos_token_id 2 selects transformers' argmax-of-ids pooling: exactly open_clip's EOT pooling
        eos_token_id=2,
        bos_token_id=None,
        pad_token_id=None,
    )
    for tower, cfg in (("vision", vision), ("text", text)):
        if cfg["hidden_size"] % cfg["num_attention_heads"]:
            raise ValueError(f"reward '{reward}': {tower} width {cfg['hidden_size']} is not divisible by "
                             f"{tower}_heads={cfg['num_attention_heads']}")
    return tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=state["visual.proj"].shape[1])


def load_openclip_as_hf(reward: str, path, vision_heads: int, text_heads: int, device: str, dtype: torch.dtype):
    """A transformers ``CLIPModel`` holding an open_clip checkpoint (``{'state_dict': ...}`` or a bare state
    dict; .pt/.pth/.bin/.safetensors), strictly loaded: every key used, none missing."""
    ckpt_file = require_file(reward, path, "path")
    obj = load_checkpoint(reward, ckpt_file)
    key = "state_dict" if isinstance(obj, dict) and "state_dict" in obj else None
    state = tensor_dict(reward, ckpt_file, obj, key)
    config = openclip_config(reward, state, vision_heads, text_heads)
    try:
        mapped = openclip_to_hf(state)
    except ValueError as e:
        raise ValueError(f"reward '{reward}': '{ckpt_file}': {e}") from None
    with torch.device(device):  # random init on the target device is fast; the weights replace it below
        model = transformers_module().CLIPModel(config)
    result = model.load_state_dict(mapped, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"reward '{reward}': '{ckpt_file}' does not fit the inferred ViT: missing "
                         f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    return model.to(dtype).eval().requires_grad_(False)


class HpsOptions(RewardOptions):
    path: str | None = None
    """``HPS_v2.1_compressed.pt`` (xswu/HPSv2; ``HPS_v2_compressed.pt`` gives HPSv2.0 the same way)."""
    tokenizer_path: str | None = None
    """A directory with the CLIP BPE as vocab.json + merges.txt (any transformers CLIP snapshot, e.g.
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K); open_clip's tokenizer uses the same BPE, 77 tokens."""
    vision_heads: int = Field(default=16, ge=1)
    """Attention heads of the image tower (not recoverable from tensor shapes; ViT-H-14: 16)."""
    text_heads: int = Field(default=16, ge=1)
    """Attention heads of the text tower (ViT-H-14: 16)."""


@register_reward("hpsv2.1", HpsOptions)
def hpsv2_1(o: HpsOptions):
    """HPSv2.1: cosine of open_clip ViT-H-14 features. ``tiny``: a random tiny CLIP with exact GELU built
    in-process, HPS's letterbox preprocessing (seeded; a test/demo twin, its scores mean nothing).
    ``frames``: also score videos, as the mean over frames.
    """
    name = "hpsv2.1"
    dtype = torch_dtype(name, o.dtype)
    if tiny_backbone(name, o.tiny, path=o.path, tokenizer_path=o.tokenizer_path):
        from otca.testing.rewards import tiny_clip

        model, tokenizer = tiny_clip(o.seed, "gelu", str(torch.device(o.device)), dtype)
    else:
        model = load_openclip_as_hf(name, o.path, o.vision_heads, o.text_heads, o.device, dtype)
        tokenizer = load_clip_tokenizer(name, o.tokenizer_path, "tokenizer_path")
    prep = LetterboxPrep(size=model.config.vision_config.image_size)
    return per_frame(ClipSimilarity(name, model, tokenizer, prep, 1.0, o.batch_size), o.frames)
