"""ImageReward (Xu et al. 2023); registers ``imagereward``.

``score = (MLP(h_CLS) - 0.16717362830052426) / 1.0333394966054072`` where ``h_CLS`` is the first token of a
BERT-base text encoder that cross-attends to BLIP ViT-L/16 image tokens (THUDM/ImageReward,
ImageReward/ImageReward.py ``score``). Roughly N(0, 1) over generated images; OTCA reports about 1.1 for FLUX.

``ImageReward.pt`` is loaded strictly onto transformers' BLIP classes, whose modules are ports of the same
BLIP code ImageReward uses:
  * ``blip.visual_encoder.*`` (timm-style BLIP ViT, LayerNorm eps 1e-6) -> ``BlipVisionModel``; its
    ``last_hidden_state`` (after the final LayerNorm, all tokens) is what ImageReward cross-attends to;
  * ``blip.text_encoder.*`` (BLIP med.py BertModel with cross-attention, no pooler) -> ``BlipTextModel`` with
    ``is_decoder=True`` in the config (which builds the cross-attention) and ``is_decoder=False`` in the call
    (bidirectional self-attention, med.py's "multimodal" mode); same parameter names;
  * ``mlp.layers.*`` -> the Linear stack (no activations);
  * ``blip.vision_proj`` / ``blip.text_proj`` (BLIP's contrastive projections) are not used by the score and
    are checked, then ignored.
Text: bert-base-uncased WordPiece plus BLIP's two added tokens, padded to 35 tokens ([CLS] kept).
Images: Resize(224, bicubic) on the short side, CenterCrop(224), OpenAI CLIP statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic import Field

from otca.rewards.heads import linear_chain
from otca.rewards.loading import (
    load_checkpoint,
    require_dir,
    require_file,
    square_side,
    tensor_dict,
    tiny_backbone,
    torch_dtype,
    transformers_module,
)
from otca.rewards.options import RewardOptions
from otca.rewards.preprocess import CropPrep
from otca.rewards.registry import register_reward
from otca.rewards.scorer import ImageModelReward, per_frame

# ImageReward.py: reward standardization constants and the prompt length.
_MEAN = 0.16717362830052426
_STD = 1.0333394966054072
_MAX_TEXT_LEN = 35
_VIT = "blip.visual_encoder."
_BERT = "blip.text_encoder."
_UNUSED = ("blip.vision_proj.", "blip.text_proj.")
# BLIP ViT (timm layout) -> BlipVisionModel, outside the blocks and inside block i.
_VIT_RENAMES = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_VIT_BLOCK = (
    ("norm1.", "layer_norm1."),
    ("norm2.", "layer_norm2."),
    ("attn.qkv.", "self_attn.qkv."),  # both pack rows as (3, heads, head_dim)
    ("attn.proj.", "self_attn.projection."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
)


def _vit_key(key: str) -> str | None:
    if key in _VIT_RENAMES:
        return _VIT_RENAMES[key]
    if key.startswith("blocks."):
        idx, rest = key[len("blocks.") :].split(".", 1)
        for src, dst in _VIT_BLOCK:
            if rest.startswith(src):
                return f"encoder.layers.{idx}.{dst}{rest[len(src):]}"
    return None


def split_imagereward_state(reward: str, path: Path, state: dict[str, torch.Tensor]):
    """``(vision, text)`` state dicts in BlipVisionModel / BlipTextModel names; raises on any unknown key.

    med.py registers ``embeddings.position_ids`` as a persistent buffer; it is ``arange`` and transformers
    rebuilds it, so it is dropped after a check.
    """
    vision, text, unknown = {}, {}, []
    for key, value in state.items():
        if key.startswith(_VIT):
            new = _vit_key(key[len(_VIT) :])
            if new is None:
                unknown.append(key)
            else:
                vision[new] = value
        elif key.startswith(_BERT):
            name = key[len(_BERT) :]
            if name == "embeddings.position_ids":
                if not torch.equal(value.flatten().long(), torch.arange(value.numel())):
                    raise ValueError(f"reward '{reward}': '{path}' {key} is not 0..n-1")
                continue
            text[name] = value
        elif not (key.startswith("mlp.") or key.startswith(_UNUSED)):
            unknown.append(key)
    if unknown:
        raise ValueError(f"reward '{reward}': '{path}' has unknown keys {unknown[:5]} ({len(unknown)} in all)")
    return vision, text


def _count(state: dict[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix) :].split(".", 1)[0] for k in state if k.startswith(prefix)})


def blip_configs(reward: str, vision: dict, text: dict, vision_heads: int, text_heads: int):
    """``(BlipVisionConfig, BlipTextConfig)`` from tensor shapes; head counts are given (ViT-L/16: 16,
    BERT-base: 12). Epsilons and activations are BLIP's: ViT LayerNorm 1e-6, BERT 1e-12, exact GELU."""
    tf = transformers_module()
    try:
        patch = vision["embeddings.patch_embedding.weight"].shape[-1]
        grid = square_side(reward, vision["embeddings.position_embedding"].shape[1] - 1, "pos_embed")
        vcfg = tf.BlipVisionConfig(
            hidden_size=vision["embeddings.class_embedding"].shape[-1],
            intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
            num_hidden_layers=_count(vision, "encoder.layers."),
            num_attention_heads=vision_heads,
            image_size=grid * patch,
            patch_size=patch,
            layer_norm_eps=1e-6,
            hidden_act="gelu",
        )
        vocab, width = text["embeddings.word_embeddings.weight"].shape
        tcfg = tf.BlipTextConfig(
            vocab_size=vocab,
            hidden_size=width,
            encoder_hidden_size=text["encoder.layer.0.crossattention.self.key.weight"].shape[1],
            intermediate_size=text["encoder.layer.0.intermediate.dense.weight"].shape[0],
            num_hidden_layers=_count(text, "encoder.layer."),
            num_attention_heads=text_heads,
            max_position_embeddings=text["embeddings.position_embeddings.weight"].shape[0],
            layer_norm_eps=1e-12,
            hidden_act="gelu",
            pad_token_id=0,
            is_decoder=True,  # builds the cross-attention; the forward passes is_decoder=False
        )
    except KeyError as e:
        raise ValueError(f"reward '{reward}': not an ImageReward checkpoint, missing {e}") from None
    for tower, cfg in (("vision", vcfg), ("text", tcfg)):
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(f"reward '{reward}': {tower} width {cfg.hidden_size} is not divisible by "
                             f"{tower}_heads={cfg.num_attention_heads}")
    return vcfg, tcfg


def _strict_load(reward: str, path: Path, module: torch.nn.Module, state: dict, what: str) -> None:
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"reward '{reward}': '{path}' {what} does not fit: missing {result.missing_keys[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")


def add_blip_tokens(tok):
    """BLIP's ``[DEC]`` bos and ``[ENC]`` tokens added as in BLIP ``init_tokenizer`` (so the id space of
    bert-base-uncased matches the 30524-row embedding)."""
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def load_blip_tokenizer(reward: str, directory: str | None, option: str):
    """bert-base-uncased's WordPiece from a local directory, with BLIP's two added tokens."""
    d = require_dir(reward, directory, option, "BERT tokenizer directory", needs=("vocab.txt",))
    return add_blip_tokens(transformers_module().BertTokenizer.from_pretrained(str(d), local_files_only=True))


def tiny_imagereward(name: str, seed: int, device: str, dtype: torch.dtype, batch_size: int) -> ImageReward:
    """The test/demo twin: ImageReward's structure at width 32 (:func:`otca.testing.rewards.tiny_blip`) with a
    tiny WordPiece plus BLIP's two tokens. Its scores mean nothing."""
    from otca.testing.rewards import TINY_BLIP_SIDE, tiny_bert_tokenizer, tiny_blip

    tok = add_blip_tokens(tiny_bert_tokenizer())
    vision, text, head = tiny_blip(seed, device, dtype, _MAX_TEXT_LEN, tok)
    prep = CropPrep(shortest_edge=TINY_BLIP_SIDE, crop=(TINY_BLIP_SIDE, TINY_BLIP_SIDE), rounding="half-even")
    return ImageReward(name, vision, text, head, tok, prep, batch_size)


class ImageReward(ImageModelReward):
    """``[B, 3, H, W]`` in [0, 1] and prompts -> ``[B]`` float32 standardized ImageReward scores."""

    def __init__(self, name: str, vision, text, head, tokenizer, prep: CropPrep, batch_size: int):
        super().__init__(name, vision, prep, batch_size)
        self.vision, self.text, self.tokenizer = vision, text, tokenizer
        self.head = head.to(self.device)  # fp32, as ImageReward casts the features with .float()

    def score(self, x: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        # x: [b, 3, 224, 224]
        img = self.vision(pixel_values=x).last_hidden_state  # [b, 1 + N, 1024]
        t = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=_MAX_TEXT_LEN, return_tensors="pt"
        )
        h = self.text(
            input_ids=t["input_ids"].to(self.device),
            attention_mask=t["attention_mask"].to(self.device),
            encoder_hidden_states=img,
            encoder_attention_mask=torch.ones(img.shape[:2], dtype=torch.long, device=self.device),
            is_decoder=False,
        ).last_hidden_state[:, 0]  # [b, 768] the [CLS] state
        return (self.head(h.float()).squeeze(-1) - _MEAN) / _STD  # [b]


class ImageRewardOptions(RewardOptions):
    path: str | None = None
    """``ImageReward.pt`` (THUDM/ImageReward)."""
    tokenizer_path: str | None = None
    """A local bert-base-uncased directory (vocab.txt)."""
    vision_heads: int = Field(default=16, ge=1)
    """Attention heads of the BLIP ViT (ImageReward's ViT-L/16: 16)."""
    text_heads: int = Field(default=12, ge=1)
    """Attention heads of the BERT text encoder (BERT-base: 12)."""


@register_reward("imagereward", ImageRewardOptions)
def imagereward(o: ImageRewardOptions):
    """ImageReward. ``tiny``: a random tiny BLIP + BERT built in-process (seeded; a test/demo twin, its scores
    mean nothing). ``frames``: also score videos, as the mean over frames."""
    name = "imagereward"
    dt = torch_dtype(name, o.dtype)
    if tiny_backbone(name, o.tiny, path=o.path, tokenizer_path=o.tokenizer_path):
        return per_frame(tiny_imagereward(name, o.seed, o.device, dt, o.batch_size), o.frames)
    ckpt_file = require_file(name, o.path, "path")
    state = tensor_dict(name, ckpt_file, load_checkpoint(name, ckpt_file))
    vision_sd, text_sd = split_imagereward_state(name, ckpt_file, state)
    vcfg, tcfg = blip_configs(name, vision_sd, text_sd, o.vision_heads, o.text_heads)
    head = linear_chain(name, ckpt_file, state, "mlp.")
    if head[0].in_features != tcfg.hidden_size:
        raise ValueError(f"reward '{name}': '{ckpt_file}' head takes {head[0].in_features} inputs, text width "
                         f"is {tcfg.hidden_size}")
    tf = transformers_module()
    with torch.device(o.device):  # random init on the target device is fast; the weights replace it below
        vision = tf.BlipVisionModel(vcfg)
        text = tf.BlipTextModel(tcfg, add_pooling_layer=False)
    _strict_load(name, ckpt_file, vision, vision_sd, "vision tower")
    _strict_load(name, ckpt_file, text, text_sd, "text encoder")
    tokenizer = load_blip_tokenizer(name, o.tokenizer_path, "tokenizer_path")
    if len(tokenizer) > tcfg.vocab_size:
        raise ValueError(f"reward '{name}': tokenizer in '{o.tokenizer_path}' has {len(tokenizer)} tokens, the "
                         f"checkpoint embeds {tcfg.vocab_size}")
    # ImageReward preprocesses with torchvision: Resize(224, bicubic) + CenterCrop(224), which rounds half to even
    prep = CropPrep(shortest_edge=vcfg.image_size, crop=(vcfg.image_size, vcfg.image_size), rounding="half-even")
    return per_frame(
        ImageReward(
            name,
            vision.to(dt).eval().requires_grad_(False),
            text.to(dt).eval().requires_grad_(False),
            head,
            tokenizer,
            prep,
            o.batch_size,
        ),
        o.frames,
    )
