"""Pretraining of the digits world's generator: the tiny FLUX and its text encoder, jointly, from scratch.

Rectified flow matching as FLUX/SD3 train it (Esser et al. 2024, Sec. 2 and 3.1): ``x_t = (1 - t) x0 + t eps``,
regress the velocity ``eps - x0`` at logit-normal ``t``; prompts are random phrasings of each image's label,
replaced by "" with probability ``prompt_dropout`` so that classifier-free guidance has an unconditional model.
The velocity comes from :class:`~otca.models.flux.FluxPolicy` itself, so pretraining and RL share one code path
(packing, position ids, text conditioning). Deterministic for a seed when bounded by ``steps`` (a ``seconds``
budget stops wherever the clock says).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

from otca.models.flux import FluxCond
from otca.worlds.digits.data import load_digit_images
from otca.worlds.digits.policy import ASSETS_DIR, digits_networks, digits_policy, save_digits_generator
from otca.worlds.digits.prompts import all_prompts, prompt_digit
from otca.worlds.digits.vae import PixelCodec

DEFAULT_STEPS = 700


def phrasings_by_digit() -> list[list[str]]:
    """For each digit 0..9, every phrasing of it in the prompt vocabulary (train and eval templates)."""
    prompts = all_prompts("all")
    return [[p for p in prompts if prompt_digit(p) == d] for d in range(10)]


def flow_matching_batch(
    x0: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noisy latents, their times and the velocity target for clean latents ``x0 [B, C, h, w]``.

    Rectified flow (Esser et al. 2024, Eq. 2 with Sec. 3.1's logit-normal(0, 1) t):
    ``x_t = (1 - t) x0 + t eps``, target ``eps - x0``. Returns ``(x_t [B, C, h, w], t [B], target [B, C, h, w])``.
    """
    t = torch.sigmoid(torch.randn(len(x0), generator=generator))  # [B] in (0, 1)
    eps = torch.randn(x0.shape, generator=generator)  # [B, C, h, w]
    tb = t.view(-1, 1, 1, 1)  # [B, 1, 1, 1]
    return (1.0 - tb) * x0 + tb * eps, t, eps - x0


def sample_prompts(
    labels: torch.Tensor, phrasings: list[list[str]], dropout: float, generator: torch.Generator
) -> list[str]:
    """A random phrasing of each label ``[B]``, or "" with probability ``dropout`` (the CFG unconditional)."""
    pick = torch.randint(0, 1 << 30, (len(labels),), generator=generator)  # [B]
    drop = torch.rand(len(labels), generator=generator) < dropout  # [B]
    return [
        "" if dropped else phrasings[int(y)][int(k) % len(phrasings[int(y)])]
        for y, k, dropped in zip(labels, pick, drop, strict=True)
    ]


@torch.no_grad()
def ema_update(ema: list[torch.Tensor], params: list[torch.nn.Parameter], step: int, decay: float) -> None:
    """EMA of the weights with warm-up ``min(decay, (1 + step) / (10 + step))``: early steps are not frozen in."""
    d = min(decay, (1.0 + step) / (10.0 + step))
    for e, p in zip(ema, params, strict=True):
        e.lerp_(p, 1.0 - d)


def pretrain_generator(
    out_dir: str | Path,
    *,
    steps: int = DEFAULT_STEPS,
    seconds: float | None = None,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 2e-3,
    warmup_steps: int = 50,
    ema_decay: float = 0.999,
    prompt_dropout: float = 0.1,
    log_every: int = 100,
    log: Callable[[str], None] = print,
) -> dict:
    """Train the tiny FLUX + text encoder on the digits train split and write their assets to ``out_dir``.

    Stops after ``steps`` optimizer steps or ``seconds`` of wall time, whichever comes first. Saves the EMA
    weights. Returns the training record that is also stored under "pretraining" in ``digits_flux.json``.
    """
    transformer, text_encoder = digits_networks(seed)
    policy = digits_policy(transformer, text_encoder, true_cfg_scale=1.0)  # the raw conditional velocity, no CFG
    text_encoder.requires_grad_(True)  # pretraining is the one place the (otherwise frozen) text encoder learns
    generator = torch.Generator().manual_seed(seed)
    images, labels = load_digit_images("train")  # [N, 1, 16, 16], [N]
    latents = PixelCodec().encode(images)  # [N, 4, 8, 8]
    phrasings = phrasings_by_digit()
    params = [*transformer.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup_steps))
    ema = [p.detach().clone() for p in params]

    start, losses, step = time.perf_counter(), [], 0
    while step < steps and (seconds is None or time.perf_counter() - start < seconds):
        idx = torch.randint(0, len(labels), (batch_size,), generator=generator)  # [B]
        x_t, t, target = flow_matching_batch(latents[idx], generator)
        prompts = sample_prompts(labels[idx], phrasings, prompt_dropout, generator)
        v = policy.velocity(x_t, t, FluxCond.build(text_encoder(prompts)))  # [B, 4, 8, 8]
        loss = torch.nn.functional.mse_loss(v, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        ema_update(ema, params, step, ema_decay)
        losses.append(loss.item())
        step += 1
        if log_every and step % log_every == 0:
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            log(f"pretrain step {step}: loss {recent:.4f} ({time.perf_counter() - start:.0f} s)")

    with torch.no_grad():
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)
    tail = losses[-min(len(losses), 50):] or [float("nan")]
    record = {
        "steps": step,
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "warmup_steps": warmup_steps,
        "ema_decay": ema_decay,
        "prompt_dropout": prompt_dropout,
        "final_loss": sum(tail) / len(tail),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "torch_threads": torch.get_num_threads(),
        "transformer_parameters": sum(p.numel() for p in transformer.parameters()),
        "text_encoder_parameters": sum(p.numel() for p in text_encoder.parameters()),
    }
    save_digits_generator(out_dir, transformer, text_encoder, record)
    return record


def main(argv: list[str] | None = None) -> dict:
    """``otca pretrain``: pretrain the digits generator (defaults rebuild the shipped assets)."""
    parser = argparse.ArgumentParser(prog="otca pretrain", description=main.__doc__)
    parser.add_argument("--out", type=Path, default=ASSETS_DIR, help="folder for the weights and configs")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps")
    parser.add_argument("--seconds", type=float, default=None, help="optional wall-time budget")
    parser.add_argument("--seed", type=int, default=0)
    # One thread by default: the shipped weights were made so, and the tiny model gains little from more
    # threads while a shared CPU makes two contending threads several times slower.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    record = pretrain_generator(args.out, steps=args.steps, seconds=args.seconds, seed=args.seed)
    print(f"wrote {args.out}: {record['steps']} steps in {record['wall_seconds']} s, loss {record['final_loss']:.4f}")
    return record


if __name__ == "__main__":
    main()
