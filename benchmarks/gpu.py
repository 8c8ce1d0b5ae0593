"""GPU benchmark at real width: a FLUX.1-width and a Wan-2.x-14B-width transformer (random bf16 weights, a few
blocks) at the OTCA paper's resolutions, LoRA and full fine-tuning, gradient checkpointing off and on.

    python benchmarks/gpu.py                      # one GPU, about 3-5 minutes on an H100/H200
    python benchmarks/gpu.py --peak-tflops 989 --json runs/gpu-bench.json
    python benchmarks/gpu.py --toy                # CPU, toy widths, seconds (what the test suite runs)

What is measured, per model x {lora, full} x {checkpointing off, on}, at two depths (``units`` 1 and 2; a FLUX
unit is 1 double-stream + 2 single-stream blocks, the 19 : 38 ratio of FLUX.1; a Wan unit is 1 block):

* one rollout call: the velocity of a micro-batch without gradient plus the Flow-SDE step (``otca.flow``);
* one update call: velocity with gradient, the transition's log-density at the stored next state, the clipped
  surrogate (``otca.flow.policy_loss``) and its backward; and one AdamW step over the trainable weights;
* decode: a random VAE of the family's real widths (FLUX.1's ``AutoencoderKL``, Wan 2.1's ``AutoencoderKLWan``)
  decoding one sample; rewards are not modelled (a stand-in of 0 s: real reward models add their own time);
* credit: TCD gains and the ``otca`` scheme on one group of random latents and rewards (independent of depth).

Phase seconds of one iteration are the measured per-call times times the setting's call counts (rollout: T
calls per micro-batch; update: trained steps per micro-batch of trained samples, one optimizer step); they
are reported at the measured depth and projected to full depth (FLUX.1: 19 + 38 blocks = 19 units; Wan 2.2:
40 blocks) by a line through the two depths (per-unit time plus the depth-independent rest). The paper's
settings: FLUX G=12, 16 steps, 512 px, 8 GPUs, one prompt group per GPU (DanceGRPO's layout), 15 trained steps
(the last dropped); Wan 2.2 G=32 rollouts, best-of-n trains 8, 16 steps, 240x416x53, a group shared by 8 GPUs
(4 rollouts, 1 trained sample each). MFU = model FLOPs (counted by ``torch.utils.flop_counter.FlopCounterMode``
without checkpointing, i.e. without the recomputation) / (time x ``--peak-tflops``, default 989 TFLOP/s: H100 /
H200 dense bf16). Peak memory is ``torch.cuda.max_memory_allocated`` of each measurement (None on CPU); the
static memory of the full-depth model (weights, plus fp32 grads and Adam moments of what trains) is computed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(SRC))

from otca.config import LoraConfig  # noqa: E402
from otca.credit import CreditConfig, CreditInputs, get_scheme, tcd_gains  # noqa: E402
from otca.flow import flow_sde_step, make_sigmas, policy_loss  # noqa: E402
from otca.models.lora import add_lora  # noqa: E402


@dataclass(frozen=True)
class Setting:
    """The paper's iteration, per GPU."""

    steps: int  # T
    trained_steps: int  # transitions trained per sample
    rollout_samples: int  # samples rolled out per GPU
    train_samples: int  # samples trained per GPU
    group: int  # G
    gpus: int
    note: str


@dataclass
class ModelSpec:
    """A transformer family at one width: how to build ``units`` of it and call it on a micro-batch."""

    name: str
    full_units: int
    setting: Setting
    micro_batch: int
    build: Callable[[int], torch.nn.Module]
    latent_shape: tuple[int, ...]  # one sample's latent, as the transformer consumes it
    call: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (net, x, sigma [b]) -> v
    decoder: Callable[[], tuple[torch.nn.Module, tuple[int, ...]]]  # (VAE, one latent's shape)
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


def flux_spec(toy: bool, device: torch.device, dtype: torch.dtype) -> ModelSpec:
    """FLUX.1-dev widths (24 heads x 128 = 3072, T5 4096, CLIP pooled 768) at 512 px: 64x64 latents of 16
    channels packed 2x2 into 1024 tokens of 64, 512 T5 tokens; toy: 2 heads x 16, 16 tokens, 8 text tokens."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    heads, head_dim, joint, pooled, rope = (2, 16, 32, 24, (4, 6, 6)) if toy else (24, 128, 4096, 768, (16, 56, 56))
    side, text_len = (8, 8) if toy else (64, 512)  # latent side, T5 tokens
    tokens = (side // 2) ** 2

    def build(units: int) -> torch.nn.Module:
        with torch.device(device):
            net = FluxTransformer2DModel(
                patch_size=1, in_channels=64, num_layers=units, num_single_layers=2 * units,
                attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=joint,
                pooled_projection_dim=pooled, guidance_embeds=True, axes_dims_rope=rope,
            )
        return net.to(dtype)

    h2 = side // 2
    rows = torch.arange(h2, device=device).repeat_interleave(h2)
    cols = torch.arange(h2, device=device).repeat(h2)
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], 1).to(dtype)  # [S, 3]
    txt_ids = torch.zeros(text_len, 3, device=device, dtype=dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    text = torch.randn(1, text_len, joint, generator=g).to(device, dtype)
    pool = torch.randn(1, pooled, generator=g).to(device, dtype)

    def call(net: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        return net(
            hidden_states=x.to(dtype), encoder_hidden_states=text.expand(b, -1, -1),
            pooled_projections=pool.expand(b, -1), timestep=sigma, img_ids=img_ids, txt_ids=txt_ids,
            guidance=torch.full_like(sigma, 3.5), return_dict=False,
        )[0].float()

    def decoder() -> tuple[torch.nn.Module, tuple[int, ...]]:
        widths = (8, 8) if toy else (128, 256, 512, 512)
        with torch.device(device):
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(widths),
                up_block_types=("UpDecoderBlock2D",) * len(widths), block_out_channels=widths,
                layers_per_block=1 if toy else 2, latent_channels=16, norm_num_groups=4 if toy else 32,
            )
        return vae.to(dtype).eval(), (16, side, side)

    setting = Setting(16, 15, 12, 12, 12, 8, "FLUX.1-dev, 512 px, G=12, 16 steps, one group per GPU, 8 GPUs")
    return ModelSpec("flux", 19, setting, 4 if not toy else 2, build, (tokens, 64), call, decoder)


def wan_spec(toy: bool, device: torch.device, dtype: torch.dtype) -> ModelSpec:
    """Wan 2.x 14B widths (40 heads x 128 = 5120, FFN 13824, UMT5 4096) at 240x416x53: latents
    [16, 14, 30, 52] (4x temporal, 8x spatial VAE), 1x2x2 patches = 5460 tokens, 512 text tokens; toy: 2 heads
    x 16, FFN 64, latents [16, 2, 4, 4]."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    heads, head_dim, ffn, text_dim = (2, 16, 64, 32) if toy else (40, 128, 13824, 4096)
    latent = (16, 2, 4, 4) if toy else (16, 14, 30, 52)
    text_len = 8 if toy else 512

    def build(units: int) -> torch.nn.Module:
        with torch.device(device):
            net = WanTransformer3DModel(
                patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16,
                out_channels=16, text_dim=text_dim, freq_dim=256 if not toy else 16, ffn_dim=ffn, num_layers=units,
                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
            )
        return net.to(dtype)

    g = torch.Generator(device="cpu").manual_seed(0)
    text = torch.randn(1, text_len, text_dim, generator=g).to(device, dtype)

    def call(net: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        return net(
            hidden_states=x.to(dtype), timestep=sigma * 1000, encoder_hidden_states=text.expand(b, -1, -1),
            return_dict=False,
        )[0].float()

    def decoder() -> tuple[torch.nn.Module, tuple[int, ...]]:
        with torch.device(device):
            vae = AutoencoderKLWan(base_dim=8 if toy else 96, z_dim=16)
        return vae.to(dtype).eval(), latent

    setting = Setting(16, 15, 4, 1, 32, 8, "Wan 2.2 A14B (one 40-block expert per step), 240x416x53, G=32 "
                      "rollouts, best-of-n trains 8, 16 steps, a group shared by 8 GPUs")
    return ModelSpec("wan", 40, setting, 1, build, latent, call, decoder, ["to_q", "to_k", "to_v", "to_out.0"])


# ------------------------------------------------------------------------------------------------ measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_s(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    times = []
    for i in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def count_flops(fn: Callable[[], Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def prepare(net: torch.nn.Module, mode: str, rank: int, targets: list[str]) -> list[torch.nn.Parameter]:
    """LoRA (fp32 adapters over frozen bf16 weights, as otca's model preparation) or full fine-tuning."""
    if mode == "lora":
        add_lora(net, LoraConfig(rank=rank, alpha=float(rank), target_modules=targets))
        for p in net.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    return [p for p in net.parameters() if p.requires_grad]


def measure(spec: ModelSpec, mode: str, units: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Per-call seconds and FLOPs of one (model, mode, depth), checkpointing off and on."""
    torch.manual_seed(0)
    net = spec.build(units)
    params = prepare(net, mode, args.lora_rank, spec.lora_targets)
    n_params = sum(p.numel() for p in net.parameters())
    n_train = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-6)
    mb = spec.micro_batch
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(mb, *spec.latent_shape, generator=g).to(device)
    sigma, sigma_next = 0.7, 0.65
    sig = torch.full((mb,), sigma, device=device)

    def rollout_call() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            v = spec.call(net, x, sig)
            x_next, logp, _, _ = flow_sde_step(x, v, sigma, sigma_next, eta=0.7)
        return x_next, logp

    x_next, old_logp = rollout_call()
    adv = torch.randn(mb, 1, generator=g).to(device)
    mask = torch.ones(mb, 1, dtype=torch.bool, device=device)

    def update_call() -> None:
        v = spec.call(net, x, sig)
        _, logp, _, _ = flow_sde_step(x, v, sigma, sigma_next, eta=0.7, prev=x_next)
        loss, _ = policy_loss(logp[:, None], old_logp[:, None], adv, mask, clip_range=1e-4)
        loss.backward()

    out: dict[str, Any] = {"units": units, "params": n_params, "trainable": n_train}
    net.eval()
    out["flops_rollout_call"] = count_flops(rollout_call)
    out["flops_update_call"] = count_flops(update_call)
    opt.zero_grad(set_to_none=True)
    for ckpt in (False, True):
        if ckpt:
            net.enable_gradient_checkpointing()
        else:
            net.disable_gradient_checkpointing()
        net.train()  # checkpointing is active in training mode only
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            t_roll = median_s(rollout_call, args.repeats, device)
        t_upd = median_s(update_call, args.repeats, device)
        t_opt = median_s(opt.step, args.repeats, device)
        opt.zero_grad(set_to_none=True)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        out["ckpt" if ckpt else "no_ckpt"] = {
            "rollout_call_s": t_roll, "update_call_s": t_upd, "optimizer_step_s": t_opt, "peak_gib": peak
        }
    return out


def measure_fixed(spec: ModelSpec, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Depth-independent costs: decoding one sample with the family's VAE, the otca credit of one group."""
    vae, shape = spec.decoder()
    z = torch.randn(1, *shape, generator=torch.Generator().manual_seed(2)).to(device, next(vae.parameters()).dtype)
    with torch.no_grad():
        t_dec = median_s(lambda: vae.decode(z), max(1, args.repeats - 1), device)
    s = spec.setting
    T = s.steps
    lat = torch.randn(s.group, T + 1, 64, device=device)  # credit runs on the latents' cosine: size-independent here
    rewards = torch.randn(s.group, 3)
    mask = torch.ones(s.group, T, dtype=torch.bool)
    mask[:, -1] = False

    def credit() -> None:
        gains = tcd_gains(lat, lat[:, -1]).cpu()
        ids = torch.zeros(s.group, dtype=torch.long)
        get_scheme("otca")(CreditInputs(rewards, ids, mask, make_sigmas(T, 3.0), gains), CreditConfig())

    return {"decode_sample_s": t_dec, "credit_s": median_s(credit, args.repeats, device)}


def phases(call: dict[str, float], fixed: dict[str, float], s: Setting, mb: int) -> dict[str, float]:
    """Seconds per phase of one iteration on one GPU from per-call times (module docstring)."""
    roll_calls = s.steps * math.ceil(s.rollout_samples / mb)
    upd_calls = s.trained_steps * math.ceil(s.train_samples / mb)
    p = {
        "rollout": roll_calls * call["rollout_call_s"],
        "decode+rewards": s.rollout_samples * fixed["decode_sample_s"],
        "credit": fixed["credit_s"],
        "update": upd_calls * call["update_call_s"] + call["optimizer_step_s"],
    }
    p["iteration"] = sum(p.values())
    return p


def line(a: float, b: float, ua: int, ub: int, u: int) -> float:
    """The value at depth ``u`` of the line through (ua, a) and (ub, b)."""
    return a + (b - a) * (u - ua) / (ub - ua)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--toy", action="store_true", help="toy widths (CPU, seconds): keeps the script working")
    ap.add_argument("--models", default="flux,wan")
    ap.add_argument("--modes", default="lora,full")
    ap.add_argument("--units", default="1,2", help="the two depths measured (FLUX unit = 1 double + 2 single blocks)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lora-rank", type=int, default=64)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="device bf16 dense peak (H100/H200 SXM: 989)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the bf16 cast of random weights warns once per model
    device = torch.device("cuda" if torch.cuda.is_available() and not args.toy else "cpu")
    dtype = torch.bfloat16
    ua, ub = (int(u) for u in args.units.split(","))
    peak = args.peak_tflops * 1e12
    specs = {"flux": flux_spec, "wan": wan_spec}
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "toy": args.toy, "peak_tflops": args.peak_tflops, "models": {}}
    print(f"# otca GPU benchmark on {result['device']} ({'toy widths' if args.toy else 'real widths'}, bf16)")
    for name in args.models.split(","):
        spec = specs[name](args.toy, device, dtype)
        s = spec.setting
        fixed = measure_fixed(spec, args, device)
        model_out: dict[str, Any] = {"setting": s.note, "fixed": fixed, "modes": {}}
        for mode in args.modes.split(","):
            ma, mb_ = measure(spec, mode, ua, args, device), measure(spec, mode, ub, args, device)
            rows = {}
            for ck in ("no_ckpt", "ckpt"):
                measured = phases(ma[ck], fixed, s, spec.micro_batch)
                full_call = {k: line(ma[ck][k], mb_[ck][k], ua, ub, spec.full_units)
                             for k in ("rollout_call_s", "update_call_s", "optimizer_step_s")}
                projected = phases(full_call, fixed, s, spec.micro_batch)
                flops = {k: line(ma[k], mb_[k], ua, ub, spec.full_units)
                         for k in ("flops_rollout_call", "flops_update_call")}
                roll_calls = s.steps * math.ceil(s.rollout_samples / spec.micro_batch)
                upd_calls = s.trained_steps * math.ceil(s.train_samples / spec.micro_batch)
                model_flops = roll_calls * flops["flops_rollout_call"] + upd_calls * flops["flops_update_call"]
                m_flops = roll_calls * ma["flops_rollout_call"] + upd_calls * ma["flops_update_call"]
                rows[ck] = {
                    "measured_depth_units": ua,
                    "measured_phases_s": measured,
                    "measured_mfu": m_flops / (measured["rollout"] + measured["update"]) / peak,
                    "peak_gib": ma[ck]["peak_gib"],
                    "peak_gib_at_2x_depth": mb_[ck]["peak_gib"],
                    "projected_phases_s": projected,
                    "projected_samples_per_s_per_gpu": s.rollout_samples / projected["iteration"],
                    "projected_mfu_transformer": model_flops / (projected["rollout"] + projected["update"]) / peak,
                }
            full_params = line(ma["params"], mb_["params"], ua, ub, spec.full_units)
            full_train = line(ma["trainable"], mb_["trainable"], ua, ub, spec.full_units)
            static = (full_params * 2 + full_train * (4 + 4 + 8 if mode == "lora" else 2 + 8)) / 2**30
            model_out["modes"][mode] = {"params_full_depth": full_params, "trainable_full_depth": full_train,
                                        "static_gib_full_depth": static, **rows}
            for ck, r in rows.items():
                pp = r["projected_phases_s"]
                print(f"{name:4s} {mode:4s} {ck:7s} measured({ua}u): iter {r['measured_phases_s']['iteration']:8.3f}s "
                      f"mfu {r['measured_mfu']:.3f} peak {r['peak_gib'] or 0:6.1f} GiB | full depth: rollout "
                      f"{pp['rollout']:8.1f}s decode {pp['decode+rewards']:6.1f}s credit {pp['credit']:.3f}s update "
                      f"{pp['update']:8.1f}s iter {pp['iteration']:8.1f}s "
                      f"{r['projected_samples_per_s_per_gpu']:.3f} samples/s/GPU "
                      f"mfu {r['projected_mfu_transformer']:.3f}")
            print(f"{name:4s} {mode:4s} full depth: {full_params / 1e9:.2f} B params, {full_train / 1e6:.1f} M "
                  f"trained, static memory {static:.1f} GiB (bf16 weights; fp32 LoRA + grads + Adam, or bf16 grads "
                  "+ fp32 Adam)")
        result["models"][name] = model_out
        print(f"{name:4s} setting: {s.note}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    run()
