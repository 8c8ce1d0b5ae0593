"""What the diffusers-backed adapters (FLUX.1, SD3, Wan) share: local-directory checks, typed options, the
build sequence of a ``model.kind`` (options, weights or tiny twin, text encoders or embedding cache, LoRA and
checkpointing, device), the sliceable conditioning, the precomputed prompt-embedding cache, classifier-free
guidance, the scaled-latent VAE conventions, and tiny offline text encoders and tokenizers.

Heavy libraries (diffusers, transformers, safetensors) are imported inside the functions that need them.
"""

from __future__ import annotations

import dataclasses
import json
import string
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    from otca.config import ModelConfig

# SD3 and Wan take the timestep in scheduler units: FlowMatchEulerDiscreteScheduler sets
# timesteps = sigmas * num_train_timesteps with num_train_timesteps = 1000 for both families.
TIMESTEP_SCALE = 1000.0

EMBEDDINGS_FORMAT = "otca-prompt-embeddings"

O = TypeVar("O", bound=BaseModel)
P = TypeVar("P", bound="DiffusersPolicy")


# ------------------------------------------------------------------------------------------- options and paths


class AdapterOptions(BaseModel):
    """Base of every adapter's ``model.options`` schema: unknown keys are errors, every field is documented."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class DiffusersOptions(AdapterOptions):
    """The ``model.options`` every diffusers adapter takes; an adapter's schema adds its guidance and text length
    and documents its default size under ``resolution``."""

    tiny: bool = False
    """Build random tiny weights in-process (no files); model.path must then be unset."""
    seed: int = 0
    """Seed of the tiny random weights (the global RNG is left untouched)."""
    negative_prompt: str = ""
    """The unconditional prompt of classifier-free guidance."""
    resolution: int | None = Field(None, gt=0)
    """Square image (frame) side in pixels; default: the model's."""
    height: int | None = Field(None, gt=0)
    """Image (frame) height in pixels (overrides resolution)."""
    width: int | None = Field(None, gt=0)
    """Image (frame) width in pixels (overrides resolution)."""
    embeddings: str | None = None
    """Precomputed prompt embeddings (a file of the policy's save_prompt_embeddings); the text encoders are not
    loaded."""
    vae_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of the VAE (decoding only)."""

    def size(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` in pixels: each given side, else ``resolution``, else the default passed in."""
        return self.height or self.resolution or height, self.width or self.resolution or width


def parse_options(schema: type[O], options: dict[str, Any]) -> O:
    """``model.options`` validated against ``schema``; a bad key or value is a one-line error naming the field."""
    from otca.config import ConfigError, format_validation_error

    try:
        return schema.model_validate(dict(options))
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "model.options")) from None


def model_dir(cfg: ModelConfig) -> Path:
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


def prepare_denoisers(denoisers: Iterable[torch.nn.Module], cfg: ModelConfig) -> None:
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


def tiny_and_path_exclusive(cfg: ModelConfig, tiny: bool) -> None:
    """Tiny random weights and a model directory exclude each other (one-line error naming both)."""
    if tiny and cfg.path is not None:
        raise ValueError(
            f"model '{cfg.kind}': model.options.tiny builds random weights in-process; leave model.path unset "
            f"(got '{cfg.path}')"
        )


# ---------------------------------------------------------------------------------------------------- building


D = TypeVar("D", bound=DiffusersOptions)


@dataclasses.dataclass(frozen=True)
class BuildInputs(Generic[D]):
    """What an adapter assembles its policy from: the validated options and the components by diffusers
    sub-folder name, with how the build read them (:func:`build_diffusers_policy`; tests build it directly)."""

    opts: D
    parts: dict[str, Any]
    dtype: torch.dtype = torch.float32  # cfg.dtype: the denoisers and text encoders
    vae_dtype: torch.dtype = torch.float32
    root: Path | None = None  # the model directory; None for tiny random weights
    cache: PromptEmbeddingCache | None = None  # None: the text encoders are in parts

    def text(self, encoder_cls: type[FrozenTextEncoders], max_sequence_length: int) -> TextFn:
        """The policy's prompt-embedding function: the cache when given, else ``encoder_cls`` on its
        ``text_parts`` of ``parts`` (the encoders cast to ``dtype``)."""
        if self.cache is not None:
            return self.cache
        encoders = [cast_module(self.parts[k], self.dtype) for k in encoder_cls.text_parts[0::2]]
        tokenizers = [self.parts[k] for k in encoder_cls.text_parts[1::2]]
        return encoder_cls(encoders, tokenizers, max_sequence_length=max_sequence_length)


def build_diffusers_policy(
    cfg: ModelConfig,
    device: torch.device,
    policy_cls: type[DiffusersPolicy],
    schema: type[D],
    tiny: Callable[..., dict[str, Any]],
    assemble: Callable[[BuildInputs[D]], P],
) -> P:
    """Every diffusers ``model.kind`` builder: ``cfg.options`` parsed with ``schema``; the parts from
    ``tiny(seed, text=...)`` or ``policy_cls.load_components`` at ``cfg.path``, text encoders only without an
    embedding cache (written for ``policy_cls.kind`` with the fields of ``policy_cls.cond_type``); the policy
    from ``assemble``; ``cfg.gradient_checkpointing`` and ``cfg.lora`` on its denoisers
    (:func:`prepare_denoisers`); the policy on ``device``."""
    opts = parse_options(schema, cfg.options)
    tiny_and_path_exclusive(cfg, opts.tiny)
    dtype, vae_dtype = getattr(torch, cfg.dtype), getattr(torch, opts.vae_dtype)
    root = None if opts.tiny else model_dir(cfg)
    # The cache is read before the weights: a bad file fails before gigabytes load.
    cache = None
    if opts.embeddings is not None:
        cache = PromptEmbeddingCache(opts.embeddings, policy_cls.kind, policy_cls.cond_type.field_names())
    if root is None:
        parts = tiny(opts.seed, text=cache is None)
    else:
        parts = policy_cls.load_components(root, text=cache is None, dtype=dtype, vae_dtype=vae_dtype)
    policy = assemble(BuildInputs(opts, parts, dtype, vae_dtype, root, cache))
    prepare_denoisers(policy.denoisers(), cfg)
    return policy.to(device)


class FrozenTextEncoders(torch.nn.Module):
    """A pipeline's frozen text encoders with their tokenizers; a subclass's ``forward`` maps prompts to the
    embeddings ``{field: [B, ...]}``.

    ``text_parts`` (set by the subclass) names the pipeline folders ``(encoder, tokenizer, encoder_2, ...)``; the
    i-th encoder becomes the submodule of its folder's name (so state-dict keys follow the folders), its tokenizer
    ``tokenizers[i]``. ``max_sequence_length`` is the token count of the long (T5-family) encoder.
    """

    text_parts: tuple[str, ...]

    def __init__(self, encoders: Sequence[torch.nn.Module], tokenizers: Sequence[Any], *, max_sequence_length: int):
        super().__init__()
        names = self.text_parts[0::2]
        if not len(encoders) == len(tokenizers) == len(names):
            raise ValueError(
                f"{type(self).__name__}: expected {len(names)} encoders and tokenizers ({', '.join(names)}), "
                f"got {len(encoders)} and {len(tokenizers)}"
            )
        for name, encoder in zip(names, encoders, strict=True):
            self.add_module(name, freeze(encoder))
        self.tokenizers = tuple(tokenizers)
        self.max_sequence_length = max_sequence_length

    @staticmethod
    def _device(encoder: torch.nn.Module) -> torch.device:
        """Where ``encoder``'s inputs go."""
        return next(encoder.parameters()).device


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
        neg = [f for f in self.field_names() if getattr(self, "neg_" + f) is not None]
        if neg and len(neg) != len(self.field_names()):
            raise ValueError(f"{name}: the negative fields must be given all together, got only {neg}")
        for f in neg:
            pos, negt = getattr(self, f), getattr(self, "neg_" + f)
            if pos.shape != negt.shape:
                raise ValueError(
                    f"{name}: neg_{f} {tuple(negt.shape)} must match {f} {tuple(pos.shape)} (both passes run as one batch)"
                )

    @classmethod
    def field_names(cls) -> list[str]:
        """The positive (prompt) field names: the fields of a text encoder's output and of an embedding cache."""
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
        return {f: getattr(self, f) for f in self.field_names()}

    def negative(self) -> dict[str, torch.Tensor] | None:
        """The negative-prompt embeddings by (positive) field name, or None without CFG."""
        if getattr(self, "neg_" + self.field_names()[0]) is None:
            return None
        return {f: getattr(self, "neg_" + f) for f in self.field_names()}

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


def check_pixel_size(height: int, width: int, multiple_h: int, multiple_w: int) -> None:
    """A one-line error unless ``height`` and ``width`` are positive multiples of ``multiple_h`` and
    ``multiple_w`` (the VAE's downsampling times the transformer's patch, per axis)."""
    if height <= 0 or width <= 0 or height % multiple_h or width % multiple_w:
        multiples = f"{multiple_h}" if multiple_h == multiple_w else f"{multiple_h} and {multiple_w}"
        raise ValueError(f"model.options height/width: expected positive multiples of {multiples}, got {height}x{width}")


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
    # The pipeline sub-folders of the text encoders and their tokenizers: (encoder, tokenizer, encoder_2, ...).
    text_parts: tuple[str, ...]

    @staticmethod
    def pipeline_classes() -> tuple[Any, Any, tuple[Any, ...]]:
        """The classes that load the ``transformer`` and ``vae`` folders and each text encoder of
        ``text_parts`` (imported when called: diffusers and transformers are heavy)."""
        raise NotImplementedError

    @classmethod
    def load_components(cls, root: Path, *, text: bool, dtype: torch.dtype, vae_dtype: torch.dtype) -> dict[str, Any]:
        """The parts of a local pipeline directory (no network) by sub-folder name: ``transformer`` in ``dtype``,
        ``vae`` in ``vae_dtype`` and, only if ``text``, the text encoders (in ``dtype``) and tokenizers."""
        names = ("transformer", "vae", *(cls.text_parts if text else ()))
        folders = {n: subfolder(root, n, cls.kind) for n in names}  # every folder checked before anything loads
        transformer_cls, vae_cls, text_classes = cls.pipeline_classes()
        parts: dict[str, Any] = {
            "transformer": transformer_cls.from_pretrained(folders["transformer"], torch_dtype=dtype),
            "vae": vae_cls.from_pretrained(folders["vae"], torch_dtype=vae_dtype),
        }
        if text:
            from transformers import AutoTokenizer

            for enc_cls, enc, tok in zip(text_classes, cls.text_parts[0::2], cls.text_parts[1::2], strict=True):
                parts[enc] = enc_cls.from_pretrained(folders[enc], dtype=dtype, local_files_only=True)
                parts[tok] = AutoTokenizer.from_pretrained(folders[tok], local_files_only=True)
        return parts

    def __init__(self, text: TextFn, *, latent_shape: Sequence[int], cfg_on: bool, negative_prompt: str):
        super().__init__()
        self.text = text
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.cfg_on = cfg_on
        self.negative_prompt = negative_prompt

    def _frozen(self) -> list[torch.nn.Module]:
        parts = (self.text, getattr(self, "vae", None), getattr(self, "codec", None))
        return [m for m in parts if isinstance(m, torch.nn.Module)]

    def train(self, mode: bool = True) -> DiffusersPolicy:
        super().train(mode)
        for m in self._frozen():
            m.eval()
        return self

    def _param(self) -> torch.nn.Parameter:
        return next(self.transformer.parameters())

    def denoisers(self) -> list[torch.nn.Module]:
        """The trained networks (LoRA and gradient checkpointing go on these): the transformer."""
        return [self.transformer]

    @staticmethod
    def _check_batch(cond: BatchedCond, b: int) -> None:
        """``velocity``'s guard: one prompt per latent."""
        if len(cond) != b:
            raise ValueError(f"velocity: cond has {len(cond)} prompts for a batch of {b} latents")

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


# ------------------------------------------------------------------------ tiny offline parts and tokenizers


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


def tiny_autoencoder_kl(
    block_out_channels: Sequence[int], *, sample_size: int, scaling_factor: float, shift_factor: float
) -> torch.nn.Module:
    """A random ``AutoencoderKL`` of the SD3 / FLUX.1 VAE layout at small width: RGB in and out, 16 latent
    channels, one down and one up block of one layer per entry of ``block_out_channels`` (2x downsampling after
    each but the last), no quant convs, the family's ``scaling_factor`` and ``shift_factor``; the global RNG
    draws it."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(block_out_channels), layers_per_block=1,
        latent_channels=16, norm_num_groups=4, sample_size=sample_size, scaling_factor=scaling_factor,
        shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False,
    )


def tiny_clip_text_model(model_cls: Any, tokenizer: Any, width: int) -> torch.nn.Module:
    """A random two-layer CLIP text tower ``model_cls`` (``CLIPTextModel`` or ``CLIPTextModelWithProjection``) of
    ``width`` over a :func:`tiny_clip_tokenizer` (its ids: 0 start, 1 end and pad); the global RNG draws it."""
    from transformers import CLIPTextConfig

    return model_cls(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, projection_dim=width,
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )
    )


def tiny_t5_encoder(model_cls: Any, config_cls: Any, tokenizer: Any, **sizes: Any) -> torch.nn.Module:
    """A random one-layer (UM)T5 encoder ``model_cls(config_cls(...))`` over ``tokenizer``'s vocabulary: 8-dim
    heads, d_ff 64, 8 position buckets, no dropout, plus ``sizes`` (d_model, num_heads, ...); the global RNG
    draws it."""
    return model_cls(
        config_cls(
            vocab_size=len(tokenizer), d_kv=8, d_ff=64, num_layers=1, relative_attention_num_buckets=8,
            dropout_rate=0.0, **sizes,
        )
    )


def tiny_t5_tokenizer(max_length: int = 512):
    """A T5 (SentencePiece-Unigram) tokenizer over printable ASCII characters, built offline.

    Ids: 0 = ``<pad>``, 1 = ``</s>``, 2 = ``<unk>``, 3 = the word-start mark, then one piece per character.
    """
    from transformers import T5Tokenizer

    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [(c, -3.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)
