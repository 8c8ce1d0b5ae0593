"""What the diffusers-backed adapters (FLUX.1, SD3, Wan) share: local-directory checks, typed options, the
sliceable conditioning, the precomputed prompt-embedding cache, classifier-free guidance, the scaled-latent VAE
conventions, and tiny offline tokenizers.

Heavy libraries (diffusers, transformers, safetensors) are imported inside the functions that need them.
"""

from __future__ import annotations

import dataclasses
import json
import string
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

if TYPE_CHECKING:
    from otca.config import ModelConfig

# SD3 and Wan take the timestep in scheduler units: FlowMatchEulerDiscreteScheduler sets
# timesteps = sigmas * num_train_timesteps with num_train_timesteps = 1000 for both families.
TIMESTEP_SCALE = 1000.0

EMBEDDINGS_FORMAT = "otca-prompt-embeddings"

O = TypeVar("O", bound=BaseModel)


# ------------------------------------------------------------------------------------------- options and paths


class AdapterOptions(BaseModel):
    """Base of every adapter's ``model.options`` schema: unknown keys are errors, every field is documented."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


def parse_options(schema: type[O], options: dict[str, Any]) -> O:
    """``model.options`` validated against ``schema``; a bad key or value is a one-line error naming the field."""
    from otca.config import ConfigError, format_validation_error

    try:
        return schema.model_validate(dict(options))
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "model.options")) from None


def model_dir(cfg: "ModelConfig") -> Path:
    """``cfg.path`` as an existing local directory, or a one-line error naming the model kind and the path."""
    if cfg.path is None:
        raise FileNotFoundError(
            f"model '{cfg.kind}': model.path is not set (expected a local diffusers model directory, "
            f"or model.options.tiny: true for random tiny weights)"
        )
    root = Path(cfg.path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"model '{cfg.kind}': model.path '{root}' is not a directory")
    return root


def subfolder(root: Path, name: str, kind: str) -> Path:
    """``root / name``, which must be a directory of the diffusers layout (one-line error otherwise)."""
    path = root / name
    if not path.is_dir():
        raise FileNotFoundError(f"model '{kind}': '{root}' has no '{name}' folder (expected a diffusers model directory)")
    return path


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """No gradients and eval mode (no dropout): text encoders and VAEs are never trained."""
    module.requires_grad_(False)
    return module.eval()


def frozen_vae(vae: torch.nn.Module) -> torch.nn.Module:
    """:func:`freeze` plus one-sample-at-a-time decoding (diffusers' ``enable_slicing``): a batch of 1024 px
    images or 81-frame videos would otherwise hold every sample's decoder activations at once."""
    vae.enable_slicing()
    return freeze(vae)


def cast_module(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` in ``dtype``, calling ``.to`` only when the dtype differs: diffusers warns on every ``.to(dtype)``
    that its ``_keep_in_fp32_modules`` get cast too. Only tiny weights are cast here; real weights load in their
    dtype through ``from_pretrained``, which keeps those modules in fp32."""
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype=dtype)
    return module


def prepare_denoisers(denoisers: Iterable[torch.nn.Module], cfg: "ModelConfig") -> None:
    """Apply ``cfg.gradient_checkpointing`` and ``cfg.lora`` to the trained networks (in place).

    LoRA weights are kept in fp32 whatever the base dtype (peft's ``autocast_adapter_dtype``, which
    ``inject_adapter_in_model`` does not apply): an AdamW step of lr 1e-5 is below bf16's resolution for weights
    of size ~1e-2 and would round to no change. peft's LoRA forward casts its input to the adapter dtype and the
    sum back to the base output's dtype, so the network still computes in ``cfg.dtype``.
    """
    from otca.models.lora import add_lora

    for net in denoisers:
        if cfg.gradient_checkpointing:
            net.enable_gradient_checkpointing()
        if cfg.lora is not None:
            add_lora(net, cfg.lora)
            for p in net.parameters():
                if p.requires_grad:
                    p.data = p.data.float()


def tiny_and_path_exclusive(cfg: "ModelConfig", tiny: bool) -> None:
    """Tiny random weights and a model directory exclude each other (one-line error naming both)."""
    if tiny and cfg.path is not None:
        raise ValueError(
            f"model '{cfg.kind}': model.options.tiny builds random weights in-process; leave model.path unset "
            f"(got '{cfg.path}')"
        )


def save_components(components: dict[str, Any], out_dir: str | Path) -> Path:
    """Write each component (a diffusers/transformers model or tokenizer) to ``out_dir/<name>`` with
    ``save_pretrained``: the directory layout the adapters' loaders read."""
    out = Path(out_dir)
    for name, component in components.items():
        if component is not None:
            component.save_pretrained(out / name)
    return out


# ------------------------------------------------------------------------------------------------ conditioning


C = TypeVar("C", bound="BatchedCond")


class BatchedCond:
    """Mixin for a frozen dataclass of text conditioning whose tensor fields are all batched along dim 0.

    A field ``neg_<name>`` holds the negative-prompt (unconditional) counterpart of ``<name>``; the negatives are
    present all together or not at all (only when the policy runs classifier-free guidance). Index it along the
    batch (``cond[2:4]``, ``cond[idx_tensor]``; an int keeps the batch dimension) to cut micro-batches.
    """

    def __post_init__(self) -> None:
        name = type(self).__name__
        sizes = {f: len(t) for f, t in self._tensors().items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"{name}: every field must have the same batch size, got {sizes}")
        neg = [f for f in self._positive_names() if getattr(self, "neg_" + f) is not None]
        if neg and len(neg) != len(self._positive_names()):
            raise ValueError(f"{name}: the negative fields must be given all together, got only {neg}")
        for f in neg:
            pos, negt = getattr(self, f), getattr(self, "neg_" + f)
            if pos.shape != negt.shape:
                raise ValueError(
                    f"{name}: neg_{f} {tuple(negt.shape)} must match {f} {tuple(pos.shape)} (both passes run as one batch)"
                )

    @classmethod
    def _positive_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if not f.name.startswith("neg_")]

    @classmethod
    def build(cls: type[C], positive: dict[str, torch.Tensor], negative: dict[str, torch.Tensor] | None = None) -> C:
        """The conditioning from text embeddings ``{field: [B, ...]}`` and optional negatives of the same shapes."""
        neg = {"neg_" + k: v for k, v in (negative or {}).items()}
        return cls(**positive, **neg)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def positive(self) -> dict[str, torch.Tensor]:
        """The prompt embeddings by field name."""
        return {f: getattr(self, f) for f in self._positive_names()}

    def negative(self) -> dict[str, torch.Tensor] | None:
        """The negative-prompt embeddings by (positive) field name, or None without CFG."""
        if getattr(self, "neg_" + self._positive_names()[0]) is None:
            return None
        return {f: getattr(self, "neg_" + f) for f in self._positive_names()}

    def __len__(self) -> int:
        return len(next(iter(self._tensors().values())))

    def __getitem__(self: C, idx: int | slice | Sequence[int] | torch.Tensor) -> C:
        """The sub-batch ``idx``."""
        idx = slice(idx, idx + 1) if isinstance(idx, int) else idx
        return dataclasses.replace(self, **{f: t[idx] for f, t in self._tensors().items()})

    def to(self: C, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> C:
        """The same conditioning on ``device`` and in ``dtype`` (None keeps each as it is)."""
        return dataclasses.replace(self, **{f: t.to(device=device, dtype=dtype) for f, t in self._tensors().items()})


# ------------------------------------------------------------------------------------ precomputed embeddings


def save_prompt_embeddings(
    path: str | Path, model: str, prompts: Sequence[str], embeddings: dict[str, torch.Tensor]
) -> Path:
    """Write the text embeddings of ``prompts`` (each ``[N, ...]``, row i for prompt i) to a safetensors file.

    The prompt list and the model family go in the file's metadata, so that a cache written for one model
    family or one prompt set is never read as another.
    """
    from safetensors.torch import save_file

    prompts = list(prompts)
    if len(set(prompts)) != len(prompts):
        raise ValueError("save_prompt_embeddings: prompts must be unique")
    for k, t in embeddings.items():
        if len(t) != len(prompts):
            raise ValueError(f"save_prompt_embeddings: '{k}' has {len(t)} rows for {len(prompts)} prompts")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": EMBEDDINGS_FORMAT, "model": model, "prompts": json.dumps(prompts)}
    save_file({k: t.detach().contiguous().cpu() for k, t in embeddings.items()}, out, metadata=meta)
    return out


class PromptEmbeddingCache:
    """Text embeddings read from a file of :func:`save_prompt_embeddings`: ``cache(prompts) -> {field: [B, ...]}``.

    It stands in for the text encoders (same call contract), so a run need not load them at all. Only the
    asked rows are read from the file on each call: a cache of many long T5 sequences never sits in memory.
    """

    def __init__(self, path: str | Path, model: str, fields: Sequence[str]):
        from safetensors import safe_open

        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(f"model '{model}': model.options.embeddings file '{self.path}' not found")
        with safe_open(str(self.path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != EMBEDDINGS_FORMAT or meta.get("model") != model:
                raise ValueError(
                    f"embeddings file '{self.path}': expected {EMBEDDINGS_FORMAT} written for model '{model}', got "
                    f"format {meta.get('format')!r}, model {meta.get('model')!r}"
                )
            missing = sorted(set(fields) - set(f.keys()))
            if missing:
                raise ValueError(f"embeddings file '{self.path}': missing tensors {missing} for model '{model}'")
        self.fields = tuple(fields)
        self.index = {p: i for i, p in enumerate(json.loads(meta["prompts"]))}

    def __call__(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        rows = []
        for p in prompts:
            if p not in self.index:
                raise KeyError(
                    f"embeddings file '{self.path}' has no entry for prompt {p!r} ({len(self.index)} prompts cached; "
                    f"write the file again with these prompts)"
                )
            rows.append(self.index[p])
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            return {k: torch.cat([f.get_slice(k)[i : i + 1] for i in rows]) for k in self.fields}  # {field: [B, ...]}


# --------------------------------------------------------------------------------------------- the network


def sigma_to_timestep(sigma: torch.Tensor, b: int, device: torch.device) -> torch.Tensor:
    """``sigma [B] (or scalar)`` in [0, 1] -> the transformer's timestep ``[B]`` in [0, 1000], kept in fp32
    (as the pipelines pass it: bf16 would round 1000 * sigma to steps of 4)."""
    return (sigma.to(device=device, dtype=torch.float32) * TIMESTEP_SCALE).reshape(-1).expand(b)  # [B]


def cfg_combine(v_cond: torch.Tensor, v_neg: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, Eq. 6, velocity form of the diffusers pipelines):
    ``v = v_neg + s * (v_cond - v_neg)``, same shape as the inputs."""
    return v_neg + scale * (v_cond - v_neg)


def guided_forward(
    net: Callable[..., torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    positive: dict[str, torch.Tensor],
    negative: dict[str, torch.Tensor] | None,
    scale: float,
) -> torch.Tensor:
    """``net(x, t, **embeddings)`` with classifier-free guidance when ``scale > 1`` (the pipelines' rule).

    ``x [B, *latent]`` and ``t [B]`` already in the network's dtype / fp32; the conditional and unconditional
    passes run as one batch of 2B. Returns the guided output ``[B, *latent]`` in fp32 (the combination is fp32).
    """
    if scale <= 1.0:
        return net(x, t, **positive).float()
    if negative is None:
        raise ValueError(f"velocity: guidance scale {scale} > 1 needs a cond with negative-prompt embeddings")
    both = {k: torch.cat([positive[k], negative[k]]) for k in positive}  # {field: [2B, ...]}
    out = net(torch.cat([x, x]), torch.cat([t, t]), **both).float()  # [2B, *latent]
    v_cond, v_neg = out.chunk(2)  # [B, *latent] each
    return cfg_combine(v_cond, v_neg, scale)


def vae_to_unit(decoded: torch.Tensor) -> torch.Tensor:
    """VAE output in [-1, 1] -> pixels in [0, 1], fp32 (diffusers' image/video processors' ``denormalize``)."""
    return (decoded.float() / 2 + 0.5).clamp(0, 1)


def vae_scale_factor(vae: torch.nn.Module) -> int:
    """Spatial downsampling of an ``AutoencoderKL``: 2 per down block after the first (the pipelines'
    ``vae_scale_factor``, 8 for the SD3 and FLUX.1 VAEs)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def decode_scaled_latents(vae: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] ``[B, 3, H, W]`` (fp32) from scaled latents ``x [B, C, h, w]`` of an ``AutoencoderKL``:
    ``z = x / scaling_factor + shift_factor`` then the decoder (pipeline_stable_diffusion_3.py and
    pipeline_flux.py, end of ``__call__``). A VAE without a shift_factor (None) has none to undo."""
    cfg = vae.config
    z = (x.float() / cfg.scaling_factor + (cfg.shift_factor or 0.0)).to(vae.dtype)  # [B, C, h, w]
    return vae_to_unit(vae.decode(z, return_dict=False)[0])  # [B, 3, H, W]


def encode_scaled_latents(vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Scaled latents ``[B, C, h, w]`` (fp32) of pixels in [0, 1] ``[B, 3, H, W]``: the posterior mean, then
    ``(z - shift_factor) * scaling_factor`` (the img2img pipelines' ``_encode_vae_image`` with the mode of the
    latent distribution: deterministic, the inverse convention of :func:`decode_scaled_latents`)."""
    cfg = vae.config
    z = vae.encode((2 * pixels.float() - 1).to(vae.dtype)).latent_dist.mode()  # [B, C, h, w]
    return (z.float() - (cfg.shift_factor or 0.0)) * cfg.scaling_factor


def draw_latents(
    n: int, shape: Sequence[int], generator: torch.Generator | list[torch.Generator], device: torch.device
) -> torch.Tensor:
    """Standard normal ``[n, *shape]`` in fp32 on ``device``; with a list, sample i uses only ``generator[i]``.

    Noise is drawn on each generator's own device, so a seed gives the same noise whatever the model device.
    """
    shape = tuple(shape)
    if isinstance(generator, torch.Generator):
        return torch.randn((n, *shape), generator=generator, device=generator.device).to(device)  # [n, *shape]
    if len(generator) != n:
        raise ValueError(f"init_latents: got {len(generator)} generators for n={n} samples")
    return torch.stack([torch.randn(shape, generator=g, device=g.device).to(device) for g in generator])


# ------------------------------------------------------------------------------------ the policy skeleton


TextFn = Callable[[list[str]], dict[str, torch.Tensor]]


class DiffusersPolicy(torch.nn.Module):
    """The shared half of the FLUX, SD3 and Wan adapters (a FlowPolicy once a subclass adds ``velocity``/``decode``).

    ``text`` maps prompts to embeddings ``{field: [B, ...]}``: the frozen text encoders (an ``nn.Module``) or a
    :class:`PromptEmbeddingCache`. The text encoders and the VAE (``self.vae``, or FLUX's latent codec
    ``self.codec``, set by the subclass) never train: they stay in eval mode whatever ``train()`` is called with.
    Only the denoiser's parameters may require grad.
    """

    kind: str  # the registered model kind, recorded in embedding caches
    cond_type: type[BatchedCond]

    def __init__(self, text: TextFn, *, latent_shape: Sequence[int], cfg_on: bool, negative_prompt: str):
        super().__init__()
        self.text = text
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.cfg_on = cfg_on
        self.negative_prompt = negative_prompt

    def _frozen(self) -> list[torch.nn.Module]:
        parts = (self.text, getattr(self, "vae", None), getattr(self, "codec", None))
        return [m for m in parts if isinstance(m, torch.nn.Module)]

    def train(self, mode: bool = True) -> "DiffusersPolicy":
        super().train(mode)
        for m in self._frozen():
            m.eval()
        return self

    def _param(self) -> torch.nn.Parameter:
        return next(self.transformer.parameters())

    def embed_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Text embeddings ``{field: [B, ...]}`` of ``prompts`` on the model's device (no gradient: frozen)."""
        with torch.no_grad():
            emb = self.text(list(prompts))
        return {k: v.to(self._param().device) for k, v in emb.items()}

    def encode(self, prompts: list[str]) -> BatchedCond:
        """Conditioning for ``prompts``, with the negative prompt's embeddings when CFG is on."""
        prompts = list(prompts)
        emb = self.embed_prompts(prompts + [self.negative_prompt] if self.cfg_on else prompts)
        b = len(prompts)
        positive = {k: v[:b] for k, v in emb.items()}
        negative = {k: v[b:].expand_as(positive[k]) for k, v in emb.items()} if self.cfg_on else None
        return self.cond_type.build(positive, negative)

    def save_prompt_embeddings(self, prompts: Sequence[str], path: str | Path, batch_size: int = 32) -> Path:
        """Encode ``prompts`` and the negative prompt once each (``batch_size`` at a time) and write them for
        ``model.options.embeddings``."""
        unique = list(dict.fromkeys([*prompts, self.negative_prompt]))
        chunks = [self.embed_prompts(unique[i : i + batch_size]) for i in range(0, len(unique), batch_size)]
        emb = {k: torch.cat([c[k].cpu() for c in chunks]) for k in chunks[0]}  # {field: [N, ...]}
        return save_prompt_embeddings(path, self.kind, unique, emb)

    def init_latents(self, n: int, generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
        """Standard normal latents ``[n, *latent_shape]`` in fp32 on the model's device."""
        return draw_latents(n, self.latent_shape, generator, self._param().device)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters that require grad: the denoiser's (all, or only LoRA weights after ``add_lora``)."""
        return [p for p in self.parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------- tiny offline tokenizers


def byte_alphabet() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE in byte order (GPT-2's ``bytes_to_unicode`` mapping):
    printable bytes map to themselves, the others to code points from 256 on."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = {b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in keep)}
    return [chr(b) if b in keep else shifted[b] for b in range(256)]


def tiny_clip_tokenizer(max_length: int = 77):
    """A CLIP BPE tokenizer with a byte-level character vocabulary and no merges, built offline.

    Ids: 0 = ``<|startoftext|>``, 1 = ``<|endoftext|>`` (also pad), then every byte symbol and its ``</w>``
    word-final form, so any text tokenizes without unknowns. Passed as a dict: transformers 5 ignores
    ``vocab_file`` / ``merges_file`` arguments here (cpu-facts.md).
    """
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in byte_alphabet():
        vocab[s] = len(vocab)
        vocab[s + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_t5_tokenizer(max_length: int = 512):
    """A T5 (SentencePiece-Unigram) tokenizer over printable ASCII characters, built offline.

    Ids: 0 = ``<pad>``, 1 = ``</s>``, 2 = ``<unk>``, 3 = the word-start mark, then one piece per character.
    """
    from transformers import T5Tokenizer

    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [(c, -3.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)
