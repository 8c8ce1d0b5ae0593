"""The run configuration: one typed tree with a docstring under every field.

Defaults train the embedded default (the tiny FLUX on digits) with OTCA. A YAML file and ``key=value``
overrides only change fields that exist: an unknown key or a value of the wrong type is a one-line error
naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, ValidationError

from otca.credit import CreditConfig
from otca.registry import Registry


class ConfigError(ValueError):
    """A config file or override that does not fit the schema (one line, names the field)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class LoraConfig(_Section):
    rank: int = Field(8, ge=1)
    """LoRA rank r."""
    alpha: float = 8.0
    """LoRA alpha (the update is scaled by alpha / rank)."""
    target_modules: list[str] = ["to_q", "to_k", "to_v", "to_out.0"]
    """Module names (peft ``target_modules``) that get LoRA adapters."""


class ModelConfig(_Section):
    kind: str = "digits-flux"
    """Which generator adapter builds the policy (a name in ``otca.models.registry``)."""
    path: str | None = None
    """Local diffusers model directory (real models); None for the embedded default's shipped weights."""
    options: dict[str, Any] = {}
    """Adapter-specific keyword options (guidance scale, resolution, ...), passed to the builder."""
    lora: LoraConfig | None = None
    """Train LoRA adapters instead of all weights (None = full fine-tuning)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the model weights; the credit and SDE math always run in fp32. Full fine-tuning wants fp32
    weights (a bf16 weight does not move under lr 1e-5 updates): use ``autocast`` for bf16 compute."""
    autocast: Literal["none", "bfloat16", "float16"] = "none"
    """Run the network under torch.autocast in this dtype (bf16 compute over fp32 weights, on GPU)."""


class RewardSpec(_Section):
    name: str
    """A registered reward (``otca.rewards.registry``)."""
    weight: float | list[float] = 1.0
    """Objective weight beta_k, used by every credit scheme (>= 0 with a positive sum, checked when credit runs).
    grpo, tcd, pcpo, tempflow: z = sum_k beta_k A_k over per-objective group advantages A_k (not renormalised:
    doubling every weight doubles z before adv_clip). flow-grpo: the raw sum sum_k beta_k r_k is group-normalised
    (the scale of beta cancels). gdpo: sum_k beta_k A_k renormalised over the batch (the scale cancels). moca, otca:
    A_k is multiplied by beta_k before MOCA, whose z = clip(lambda/2, min_k beta_k A_k, max_k beta_k A_k) with lambda
    gated by the sign of sum_k beta_k A_k: beta moves both MOCA's bounds and its gate. One number weights every
    score column of the reward; a list gives one weight per column (a multi-objective reward such as ``videoalign``)."""
    options: dict[str, Any] = {}
    """Keyword options for the reward's factory (local weight paths, batch size, ...)."""


class PromptConfig(_Section):
    train: str = "digits:train"
    """Training prompts: 'digits:<split>' for the embedded world, or a text file with one prompt per line."""
    eval: str = "digits:eval"
    """Held-out evaluation prompts, same forms as ``train``."""


def _shift_value(value: Any) -> float | str:
    """``sampler.shift``: a finite number > 0 or the string 'auto' (one error for both, not one per union member)."""
    if value == "auto":
        return "auto"
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    raise ValueError("expected a number > 0 or 'auto'")


class SdeWindowConfig(_Section):
    size: int = Field(4, ge=1)
    """Steps in the window (MixGRPO: 4 of 25): SDE steps, the only ones trained; ODE steps outside it."""
    mode: str = "sliding"
    """How the window moves with the iteration (a name in ``otca.flow.WINDOWS``): 'sliding' (MixGRPO's progressive
    window: the start advances by ``shift`` every ``iters_per_shift`` iterations from ``lo``, back to ``lo`` past the
    end) or 'random' (Flow-GRPO-Fast: a start drawn per iteration from ``lo .. hi - size``)."""
    lo: int = Field(0, ge=0)
    """First step the window may cover."""
    hi: int | None = None
    """Exclusive end of the steps the window may cover; None = num_steps - 1 (the last step is never trained)."""
    shift: int = Field(1, ge=1)
    """Steps a sliding window advances at a time."""
    iters_per_shift: int = Field(1, ge=1)
    """Iterations between two advances of a sliding window (MixGRPO: 25)."""


class SamplerConfig(_Section):
    num_steps: int = Field(16, ge=1)
    """Denoising steps T of a rollout."""
    shift: Annotated[float | Literal["auto"], PlainValidator(_shift_value)] = 3.0
    """Time shift s of the sigma schedule: sigma -> s*sigma / (1 + (s-1)*sigma). 'auto': FluxPipeline's dynamic
    shift, s = exp(mu) with mu from the image token count and the model's scheduler config (FLUX adapter only;
    1.88 at 512x512, 3.16 at 1024x1024 for FLUX.1-dev)."""
    schedule: Literal["shift", "diffusers"] = "shift"
    """Sigma grid before and after the shift, for rollouts and evaluation alike: 'shift' = linspace(1, 0, T+1) shifted
    (DanceGRPO, FluxPipeline); 'diffusers' = diffusers' FlowMatchEulerDiscreteScheduler(shift=s).set_timesteps(T)
    default (StableDiffusion3Pipeline, Flow-GRPO's SD3 recipe): shifted twice, its last step ends at 0.0089 for
    T=10, s=3 instead of 0.25. 'diffusers' takes a numeric shift."""
    sde: str = "flow-sde"
    """Stochastic transition of rollouts (a name in ``otca.flow.TRANSITIONS``): 'flow-sde' (Flow-GRPO), 'dance-sde'
    (DanceGRPO) or 'cps' (coefficients-preserving sampling, arXiv 2509.05952: its last step is deterministic, so it
    needs ``train.drop_last_step`` or a window that ends before the last step)."""
    eta: float = Field(0.7, ge=0)
    """Noise level of the SDE (Flow-SDE: std_t = eta*sqrt(sigma/(1-sigma)) sqrt(dt); Dance-SDE: constant eta;
    CPS: std = sigma_next*sin(eta*pi/2), eta in [0, 1])."""
    sde_window: SdeWindowConfig | None = None
    """SDE window (MixGRPO, Flow-GRPO-Fast): SDE steps inside a window that moves with the iteration, ODE steps
    outside it, only the window's steps trained (the update costs ~size/T of the full one). None = every step
    stochastic. Set a field to turn it on, e.g. ``sampler.sde_window.size=4``; fields size, mode, lo, hi, shift,
    iters_per_shift."""
    same_noise_per_group: bool = True
    """All samples of a prompt group start from the same initial noise (DanceGRPO's init_same_noise)."""
    final_latent: Literal["x0", "last"] = "x0"
    """Latent that is decoded, scored and used by TCD: the last step's clean prediction or the last state."""
    eval_steps: int = Field(16, ge=1)
    """ODE steps used for evaluation samples."""


class TrainConfig(_Section):
    iterations: int = Field(120, ge=0)
    """Number of GRPO iterations (rollout + update)."""
    prompts_per_iter: int = Field(6, ge=1)
    """Prompt groups per iteration, summed over all processes."""
    group_size: int = Field(8, ge=2)
    """Samples per prompt (G)."""
    scheme: str = "otca"
    """Credit scheme by name (``otca.credit.scheme_names()``)."""
    credit: CreditConfig = CreditConfig()
    """Options of the credit math (advantage clip, TCD floor, MOCA epsilons, std convention, ...)."""
    lr: float = Field(5e-5, gt=0)
    """AdamW learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this value before each optimizer step (None = off)."""
    updates_per_iter: int = Field(1, ge=1)
    """Optimizer steps per iteration: the batch is split into this many parts, gradients accumulated within each."""
    micro_batch: int = Field(16, ge=1)
    """Samples per forward pass (rollout and update); gradients accumulate over micro-batches."""
    inner_epochs: int = Field(1, ge=1)
    """Passes over each iteration's rollouts (the ratio differs from 1 from the second optimizer step on)."""
    clip_range: float = Field(1e-3, gt=0)
    """PPO ratio clip epsilon: clip(rho, 1-eps, 1+eps)."""
    objective: Literal["clip", "log-hinge"] = "clip"
    """Policy objective: the clipped surrogate, or PCPO's log-hinge."""
    kl_coef: float = Field(0.1, ge=0)
    """Weight of the KL to the initial policy (a mean-difference penalty, form set by ``kl_form``); 0 = off."""
    kl_form: Literal["exact", "flow-grpo"] = "exact"
    """How the KL divides the squared mean difference of the two transitions: 'exact' by 2 std^2 with the
    transition std g*sqrt(sigma - sigma_next) (the exact Gaussian KL); 'flow-grpo' by 2 g^2 (Flow-GRPO's
    train_sd3.py, no sqrt(dt) factor). exact = flow-grpo / (sigma - sigma_next): 4x-28x on 10 shift-3 steps, so use
    'flow-grpo' with a kl_coef taken from Flow-GRPO."""
    timestep_fraction: float = Field(1.0, gt=0, le=1)
    """Fraction of the (non-dropped) transitions trained each iteration."""
    timestep_selection: Literal["random", "prefix"] = "random"
    """Which transitions: a random subset per sample (DanceGRPO) or the first ones (Flow-GRPO)."""
    drop_last_step: bool = True
    """Never train the last transition (DanceGRPO does this)."""
    ratio_guard: str = "none"
    """Transform of the importance ratio before the objective (a name in ``otca.flow.RATIO_GUARDS``): 'none', or
    'ratio-norm' (GRPO-Guard, arXiv 2510.22319: the ratio's bias removed and rescaled by the step's std, each step's
    term weighted by 1/dt; the paper pairs it with a tiny clip_range, 2e-6 to 4e-6)."""
    ema_decay: float | None = None
    """Keep an EMA of the trainable weights (used for eval and sampling); None = off."""
    step_rewards_every: int = Field(1, ge=1)
    """Schemes that need step rewards (reward-gain, reward-gain-moca, step-moca: T decodes and reward calls per
    sample) measure them on every N-th iteration only (0, N, 2N, ...); on the others every sample gets the run's
    running per-objective gain profile (``step_profile_decay``) in place of its own gains. 1 = every iteration.
    Other schemes ignore it."""
    step_profile_decay: float = Field(0.5, ge=0, lt=1)
    """Decay of that running profile: after each measured iteration, profile = decay * profile + (1 - decay) *
    the iteration's mean scaled gain per objective and transition (over the samples that train it)."""


class MonitorConfig(_Section):
    signals: dict[str, Literal["up", "down"]] = {"eval/judge_alignment": "up", "eval/fidelity_fd": "down"}
    """Held-out eval metrics the reward-hacking monitor watches, each with the direction it should move ('up':
    higher is better); a metric the eval suite does not report is skipped (otca.monitor)."""
    window: int = Field(1, ge=1)
    """Compare each periodic evaluation with the one this many evaluations earlier (the first, before training,
    when there are fewer)."""
    tolerance: float = Field(0.05, ge=0)
    """Alarm when a training reward on the eval prompts rose while a signal fell by more than this fraction of its
    earlier value."""


class EvalConfig(_Section):
    every: int = Field(10, ge=0)
    """Evaluate every N iterations (0 = only before and after training); each periodic evaluation also runs the
    reward-hacking monitor (``monitor``). The embedded default's eval costs about 0.4 of an iteration, so every
    10 adds about 4 % to a run; the real-model configs set 0."""
    samples_per_prompt: int = Field(4, ge=1)
    """ODE samples per eval prompt (fixed seeds)."""
    seed: int = 1234
    """Seed of the evaluation noise (the same at every evaluation)."""
    metrics: str | None = "digits"
    """Eval-only metric suite (``otca.evaluate``), None for rewards only."""
    monitor: MonitorConfig = MonitorConfig()
    """The drift alarm of periodic evaluations: a training reward rising while a held-out signal falls."""


class RunConfig(_Section):
    seed: int = 0
    """Run seed: every sample's noise is seeded from (seed, iteration, global sample index)."""
    out_dir: str = "runs/otca"
    """Run directory (config, metrics, plots, samples, checkpoints, summary)."""
    model: ModelConfig = ModelConfig()
    """The generator."""
    rewards: list[RewardSpec] = [
        RewardSpec(name="digit-alignment"),
        RewardSpec(name="stroke-quality"),
        RewardSpec(name="jpeg-compressibility"),
    ]
    """The K training objectives (one column each of the reward matrix)."""
    prompts: PromptConfig = PromptConfig()
    """Prompt sets."""
    sampler: SamplerConfig = SamplerConfig()
    """Rollout sampling."""
    train: TrainConfig = TrainConfig()
    """Optimisation and credit assignment."""
    eval: EvalConfig = EvalConfig()
    """Evaluation."""
    checkpoint_every: int = Field(0, ge=0)
    """Write a checkpoint every N iterations (0 = only at the end)."""
    fsdp: bool = False
    """Shard the model with FSDP2 instead of DDP when running under torchrun."""
    ddp_find_unused_parameters: bool = False
    """Let DDP tolerate parameters without a gradient in a step (Wan 2.2's two experts: a batch may use one)."""
    progress: bool = True
    """Show a progress bar with the live rewards."""
    plots: bool = True
    """Write the sample grids, reward curves and credit heatmap (off saves ~3 s a run in quick comparisons)."""
    save_credit: bool = False
    """Also save every iteration's global rewards, step gains and advantages under credit/ (for analysis)."""


# ---------------------------------------------------------------- loading and overrides


def format_validation_error(e: ValidationError, source: str) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "<root>"
    if err["type"] == "extra_forbidden":
        return f"{source}: unknown config key '{loc}'"
    more = f" (+{e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return f"{source}: config field '{loc}': {err['msg']} (got {err.get('input')!r}){more}"


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if node.get(k) is None:  # a section that is off (null) is turned on by setting one of its fields
            node[k] = {}
        node = node[k]
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{k}' is not a section")
    node[keys[-1]] = value


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=1e-4")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    return key.strip(), value


def _registered_names(cfg: RunConfig) -> list[tuple[str, str, Registry[Any]]]:
    """(field, value, registry) for every name in ``cfg`` that a registry must know.

    The registries are imported here, not at module level: they pull in torch and the credit core, and the
    model and reward registries import their provider modules (cheap: heavy imports happen inside builders).
    """
    from otca.credit.schemes import SCHEMES
    from otca.flow.loss import RATIO_GUARDS
    from otca.flow.sde import TRANSITIONS
    from otca.flow.window import WINDOWS
    from otca.models.registry import POLICIES
    from otca.rewards.registry import REWARDS

    window = cfg.sampler.sde_window
    return [
        ("train.scheme", cfg.train.scheme, SCHEMES),
        ("sampler.sde", cfg.sampler.sde, TRANSITIONS),
        *((("sampler.sde_window.mode", window.mode, WINDOWS),) if window is not None else ()),
        ("train.ratio_guard", cfg.train.ratio_guard, RATIO_GUARDS),
        ("model.kind", cfg.model.kind, POLICIES),
        *((f"rewards.{i}.name", r.name, REWARDS) for i, r in enumerate(cfg.rewards)),
    ]


def check_names(cfg: RunConfig, source: str = "config") -> None:
    """Raise :class:`ConfigError` (one line: the field, the name, the known names) for a credit scheme, SDE
    transition, model kind or reward name that is not registered, so a typo fails before any model loads."""
    for field, name, registry in _registered_names(cfg):
        if name not in registry:
            known = ", ".join(registry.names())
            raise ConfigError(f"{source}: config field '{field}': unknown {registry.kind} {name!r} (known: {known})")


def window_spec(cfg: RunConfig) -> Any:
    """The :class:`otca.flow.WindowSpec` of ``sampler.sde_window`` on ``sampler.num_steps``, None when off."""
    from otca.flow.window import WindowSpec

    w = cfg.sampler.sde_window
    if w is None:
        return None
    return WindowSpec(cfg.sampler.num_steps, w.size, lo=w.lo, hi=w.hi, shift=w.shift, iters_per_shift=w.iters_per_shift)


def check_sampling(cfg: RunConfig, source: str = "config") -> None:
    """Raise :class:`ConfigError` (one line) for an SDE window that does not fit ``num_steps``, or for a trained
    last step that the transition makes deterministic (CPS: ``sigma_next = 0`` gives std 0 and no log-density), or
    an ``eta`` outside the transition's range.

    The transition is asked, not named: its std on a last step (``sigma -> 0``) at ``sampler.eta`` is probed."""
    import torch

    from otca.flow.sde import TRANSITIONS

    s, t = cfg.sampler, cfg.train
    spec = window_spec(cfg)
    if spec is not None:
        try:
            spec.check()
        except ValueError as e:
            raise ConfigError(f"{source}: config field 'sampler.sde_window': {e}") from None
    z = torch.zeros(1, 1)
    try:  # a last step, sigma 0.5 -> 0 (also checks eta against the transition's range)
        _, _, _, std = TRANSITIONS.get(s.sde)(z, z, 0.5, 0.0, eta=s.eta, noise=z)
    except ValueError as e:
        raise ConfigError(f"{source}: config field 'sampler.eta': {e}") from None
    if not t.drop_last_step and (spec is None or spec.end == s.num_steps):
        if not bool((std > 0).all()):
            raise ConfigError(
                f"{source}: config field 'train.drop_last_step': false trains the last step, which sampler.sde "
                f"{s.sde!r} at eta {s.eta} makes deterministic (no log-density): set it to true"
            )


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Defaults, then the YAML file (if any), then ``key=value`` overrides (dotted keys); every registry name
    is checked (:func:`check_names`), and the sampler settings fit together (:func:`check_sampling`)."""
    tree: dict[str, Any] = {}
    source = "config"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' not found")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{p}': not valid YAML ({str(e).splitlines()[0]})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file '{p}': expected a mapping at the top level")
        tree = loaded or {}
        source = str(p)
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(tree, key, value)
    try:
        cfg = RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None
    check_names(cfg, source)
    check_sampling(cfg, source)
    return cfg


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------- the documented YAML

DEFAULT_CONFIG_HEADER = """\
# The defaults, written out: OTCA on the embedded tiny FLUX with the digits world's three rewards.
# `otca train` with no config runs exactly this; copy the file as a starting point for your own runs.
# Generated from the field docstrings of src/otca/config.py by `otca config` (a test keeps them equal).
#
#   otca train --config configs/digits.yaml
#   otca train --config configs/digits.yaml train.scheme=grpo train.iterations=100
#   torchrun --nproc_per_node 2 -m otca train --config configs/digits.yaml
"""


def _render_section(section: BaseModel, indent: str) -> list[str]:
    """YAML lines of ``section``: each field's docstring as comment lines above its value; nested sections
    recurse, every other value (scalars, lists, mappings, lists of sections) is dumped as plain YAML."""
    lines: list[str] = []
    for name, info in type(section).model_fields.items():
        lines += [f"{indent}# {line}".rstrip() for line in (info.description or "").splitlines()]
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            lines.append(f"{indent}{name}:")
            lines += _render_section(value, indent + "  ")
        else:
            plain = section.model_dump(mode="json", include={name})
            dumped = yaml.safe_dump(plain, sort_keys=False, default_flow_style=False)
            lines += [indent + line for line in dumped.splitlines()]
    return lines


def render_config(cfg: RunConfig, header: str = "") -> str:
    """``cfg`` as YAML with every field's docstring as a comment above it; loads back to an equal config."""
    body = "\n".join(_render_section(cfg, "")) + "\n"
    return f"{header}\n{body}" if header else body


def default_config_yaml() -> str:
    """The text of ``configs/digits.yaml``: the defaults with their docstrings (``otca config`` prints it)."""
    return render_config(RunConfig(), DEFAULT_CONFIG_HEADER)
