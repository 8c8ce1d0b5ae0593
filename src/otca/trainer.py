"""The GRPO loop, as named phases: prompts -> rollout -> rewards -> credit -> update -> log / eval / checkpoint.

Nothing here knows a scheme, model or reward by name: they come from registries. The same code runs in
one process or under ``torchrun``: each rank rolls out its slice of the global batch, the credit math runs
on the all-gathered rewards and step gains, and DDP (or FSDP2) synchronises the gradients.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from otca import dist as odist
from otca.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from otca.config import RunConfig, dump_config
from otca.credit import CreditInputs, CreditOutput, get_scheme, tcd_gains
from otca.diagnostics import (
    plot_curves,
    plot_weight_heatmap,
    save_grid,
    step_weight_profile,
    zero_variance_groups,
)
from otca.evaluate import EvalResult, evaluate_policy, load_prompts
from otca.flow import get_transition, kl_to_reference, make_sigmas, policy_loss
from otca.models.registry import build_policy
from otca.rewards.base import RewardSet
from otca.rewards.registry import build_reward
from otca.rollout import (
    STREAM_PROMPTS,
    STREAM_STEP_MASK,
    Trajectory,
    initial_noise,
    sample_sde,
    seeded_generator,
    select_train_steps,
)


class _Velocity(torch.nn.Module):
    """``forward = policy.velocity``, so DDP / FSDP2 can wrap any FlowPolicy without reaching inside it.

    With ``autocast`` the network runs under torch.autocast (weights stay in their own dtype, e.g. fp32);
    the velocity comes back in the latents' dtype and the SDE and credit math stay in fp32.
    """

    def __init__(self, policy: torch.nn.Module, autocast: torch.dtype | None = None):
        super().__init__()
        self.policy = policy
        self.autocast = autocast

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        if self.autocast is None:
            return self.policy.velocity(x, sigma, cond)
        with torch.autocast(device_type=x.device.type, dtype=self.autocast):
            return self.policy.velocity(x, sigma, cond).to(x.dtype)


@dataclass
class Batch:
    """This rank's share of one iteration's prompts."""

    prompts: list[str]  # [b] one per sample
    group_ids: torch.Tensor  # [b] global prompt-group index
    indices: list[int]  # [b] global sample index


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path | None = None, info: odist.DistInfo | None = None):
        self.cfg = cfg
        self.info = info or odist.init_distributed()
        self.run_dir = Path(run_dir or cfg.out_dir)
        torch.manual_seed(cfg.seed)
        self.policy = build_policy(cfg.model, self.info.device)
        self.rewards = RewardSet([build_reward(r.name, **r.options) for r in cfg.rewards])
        self.reward_weights = torch.tensor([r.weight for r in cfg.rewards], dtype=torch.float32)
        self.train_prompts = load_prompts(cfg.prompts.train)
        self.eval_prompts = load_prompts(cfg.prompts.eval)
        self.scheme = get_scheme(cfg.train.scheme)
        self.transition = get_transition(cfg.sampler.sde)
        self.sigmas = make_sigmas(
            cfg.sampler.num_steps, cfg.sampler.shift, cfg.sampler.schedule,
            dynamic=getattr(self.policy, "dynamic_shift", None),
        )
        if not any(p.requires_grad for p in self.policy.parameters()):
            raise ValueError("model: no trainable parameters")
        if cfg.fsdp and cfg.train.kl_coef > 0:
            raise ValueError("train.kl_coef > 0 is not supported with fsdp=true yet (the reference call needs whole weights)")
        autocast = None if cfg.model.autocast == "none" else getattr(torch, cfg.model.autocast)
        self.velocity_module = _Velocity(self.policy, autocast)
        self.fsdp = cfg.fsdp and self.info.distributed
        self.model = self._wrap(self.velocity_module)
        # collected after wrapping: FSDP2 replaces the parameters by sharded ones
        self.params = {n: p for n, p in self.policy.named_parameters() if p.requires_grad}
        t = cfg.train
        self.optimizer = torch.optim.AdamW(
            self.params.values(), lr=t.lr, betas=t.betas, eps=t.adam_eps, weight_decay=t.weight_decay
        )
        self.ema = {n: p.detach().clone() for n, p in self.params.items()} if t.ema_decay else None
        self.ref = {n: p.detach().clone() for n, p in self.params.items()} if t.kl_coef > 0 else None
        self.start_iteration = 0
        self.weight_profiles: list[list[float]] = []
        self.writer = None

    # ------------------------------------------------------------------ setup helpers

    def _wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        if not self.info.distributed:
            return module
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            # frozen parts (text encoders, VAE) stay whole: they are used outside the wrapped forward
            frozen = {p for p in module.parameters() if not p.requires_grad}
            return fully_shard(module, ignored_params=frozen)
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(
            module,
            device_ids=[self.info.device.index] if self.info.device.type == "cuda" else None,
            find_unused_parameters=self.cfg.ddp_find_unused_parameters,
        )

    def resume(self) -> None:
        """Load the latest checkpoint of ``run_dir``: weights, EMA, optimizer and loop state."""
        ck = load_checkpoint(latest_checkpoint(self.run_dir))
        missing = set(self.params) ^ set(ck["weights"])
        if missing:
            raise ValueError(f"checkpoint does not match the model: {len(missing)} mismatched tensors, e.g. {sorted(missing)[0]}")
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(_like(ck["weights"][n], p))
        if self.ema is not None and ck["ema"] is not None:
            self.ema = {n: _like(t, self.params[n]) for n, t in ck["ema"].items()}
        self._load_optimizer_state(ck["optimizer"])
        self.start_iteration = ck["state"]["iteration"]
        self.weight_profiles = ck["state"].get("weight_profiles", [])
        self._truncate_metrics(self.start_iteration)

    def _truncate_metrics(self, iteration: int) -> None:
        """Drop log rows written after the checkpoint, so a resumed run's logs equal an uninterrupted run's."""
        for name, keep in (("metrics.jsonl", lambda i: i < iteration), ("eval.jsonl", lambda i: i <= iteration)):
            path = self.run_dir / name
            if self.info.is_main and path.is_file():
                rows = [l for l in path.read_text().splitlines() if l and keep(json.loads(l)["iteration"])]
                path.write_text("".join(r + "\n" for r in rows))

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict[str, Any]:
        cfg, t0 = self.cfg, time.time()
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        summary_path = self.run_dir / "summary.json"
        prior = json.loads(summary_path.read_text()) if self.start_iteration and summary_path.is_file() else {}
        eval_before = prior.get("eval_before") or self.evaluate("before").metrics
        bar = self._progress()
        for it in range(self.start_iteration, cfg.train.iterations):
            batch = self.sample_prompts(it)
            traj, cond = self.rollout(batch, it)
            rewards = self.score(traj, batch)
            credit, adv, mask = self.assign_credit(traj, rewards, batch, it)
            stats = self.update(traj, cond, adv, mask)
            row = self.log(it, rewards, credit, mask, stats, time.time() - t0)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k.split("/")[-1][:10]: f"{v:.3f}" for k, v in row.items() if k.startswith("reward/")})
            if cfg.eval.every and (it + 1) % cfg.eval.every == 0 and it + 1 < cfg.train.iterations:
                self.log_eval(it + 1, self.evaluate(None).metrics)
            if cfg.checkpoint_every and (it + 1) % cfg.checkpoint_every == 0:
                self.save(it + 1)
        if bar is not None:
            bar.close()
        after = self.evaluate("after")
        self.save(cfg.train.iterations)
        wall = time.time() - t0 + prior.get("wall_seconds", 0.0)
        summary = {
            "scheme": cfg.train.scheme,
            "iterations": cfg.train.iterations,
            "eval_before": eval_before,
            "eval_after": after.metrics,
            "wall_seconds": wall,
            "world_size": self.info.world_size,
            "diagnostics": self._run_diagnostics() if self.info.is_main else {},
        }
        if self.info.is_main:
            self.log_eval(cfg.train.iterations, after.metrics)
            summary_path.write_text(json.dumps(summary, indent=1))
            if cfg.plots:
                self.write_plots()
        if self.writer is not None:
            self.writer.close()
        return summary

    # ------------------------------------------------------------------ phases

    def sample_prompts(self, it: int) -> Batch:
        """The global batch: ``prompts_per_iter`` prompts (seeded by iteration) x ``group_size`` samples."""
        t = self.cfg.train
        g = seeded_generator(self.cfg.seed, it, STREAM_PROMPTS, 0)
        order = torch.randperm(len(self.train_prompts), generator=g)
        picks = [self.train_prompts[int(order[i % len(order)])] for i in range(t.prompts_per_iter)]
        n = t.prompts_per_iter * t.group_size
        mine = range(n)[self.info.shard(n)]
        return Batch(
            prompts=[picks[i // t.group_size] for i in mine],
            group_ids=torch.tensor([i // t.group_size for i in mine]),
            indices=list(mine),
        )

    def rollout(self, batch: Batch, it: int) -> tuple[Trajectory, Any]:
        s = self.cfg.sampler
        cond = self.policy.encode(batch.prompts)
        x = initial_noise(self.policy, self.cfg.seed, it, batch.indices, batch.group_ids.tolist(), s.same_noise_per_group)
        with self.eval_mode():
            traj = sample_sde(
                self.policy, cond, x, self.sigmas, sde=s.sde, eta=s.eta, seed=self.cfg.seed, iteration=it,
                indices=batch.indices, final_latent=s.final_latent, micro_batch=self.cfg.train.micro_batch,
                velocity=self.model,
            )
        return traj, cond

    def score(self, traj: Trajectory, batch: Batch) -> torch.Tensor:
        """Decode the final latents and score them: ``[b, K]`` (a failing reward raises, naming itself)."""
        with torch.no_grad():
            pixels = self.policy.decode(traj.final).float().clamp(0, 1)
        self._last_pixels = pixels
        return self.rewards(pixels, batch.prompts)

    def assign_credit(
        self, traj: Trajectory, rewards: torch.Tensor, batch: Batch, it: int
    ) -> tuple[CreditOutput, torch.Tensor, torch.Tensor]:
        """The scheme's output on the gathered global batch, and this rank's advantages and mask ``[b, T]``."""
        t, info = self.cfg.train, self.info
        T = len(self.sigmas) - 1
        n_global = t.prompts_per_iter * t.group_size
        mask_global = select_train_steps(
            n_global, T, fraction=t.timestep_fraction, mode=t.timestep_selection, drop_last=t.drop_last_step,
            generator=seeded_generator(self.cfg.seed, it, STREAM_STEP_MASK, 0),
        )
        gains = tcd_gains(traj.latents, traj.final)  # [b, T] fp32, cheap, local
        dev = info.device
        inputs = CreditInputs(
            rewards=odist.all_gather_rows(rewards.to(dev), info).cpu(),
            group_ids=odist.all_gather_rows(batch.group_ids.to(dev), info).cpu(),
            mask=mask_global,
            sigmas=self.sigmas,
            gains=odist.all_gather_rows(gains.to(dev), info).cpu(),
            reward_weights=self.reward_weights,
            reward_names=tuple(self.rewards.names),
        )
        out = self.scheme(inputs, t.credit)
        self._global_credit = (inputs, out)
        if self.cfg.save_credit and info.is_main:
            from safetensors.torch import save_file

            (self.run_dir / "credit").mkdir(parents=True, exist_ok=True)
            tensors = {"rewards": inputs.rewards, "gains": inputs.gains, "mask": inputs.mask.to(torch.uint8),
                       "group_ids": inputs.group_ids, "advantages": out.advantages, "weights": out.weights}
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(self.run_dir / "credit" / f"iter-{it:06d}.safetensors"))
        mine = info.shard(n_global)
        return out, out.advantages[mine], mask_global[mine]

    def update(self, traj: Trajectory, cond: Any, adv: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
        """Clipped-surrogate steps on this rank's rollouts; gradients averaged over ranks by DDP/FSDP.

        Every rank runs the same sequence of forward/backward calls (one per micro-batch and trained step),
        and each loss is a sum over masked entries divided by the global count / world size, so the
        synchronised gradient is exactly the gradient of the global mean over trained (sample, step) pairs.
        """
        t, info = self.cfg.train, self.info
        dev = info.device
        b, T = adv.shape
        adv, mask = adv.to(dev), mask.to(dev)
        old_logp = traj.log_probs.to(dev)
        parts = [slice(i * b // t.updates_per_iter, (i + 1) * b // t.updates_per_iter) for i in range(t.updates_per_iter)]
        steps = [k for k in range(T) if bool(odist.all_reduce_sum(mask[:, k].sum(), info) > 0)]
        acc = _MetricAccumulator()
        first_ratio_dev = None
        for epoch in range(t.inner_epochs):
            for pi, part in enumerate(parts):
                count = odist.all_reduce_sum(mask[part].sum(), info)
                if count == 0:
                    continue
                normalizer = float(count) / info.world_size
                calls = [(mb, k) for mb in _chunks(part, t.micro_batch) for k in steps]
                self.optimizer.zero_grad(set_to_none=True)
                for ci, (mb, k) in enumerate(calls):
                    sync = ci == len(calls) - 1
                    with self._no_sync(not sync):
                        loss, m = self._step_loss(traj, cond, adv, mask, old_logp, mb, k, normalizer)
                        loss.backward()
                    acc.add(m, int(mask[mb, k].sum()))
                if epoch == 0 and pi == 0:
                    first_ratio_dev = acc.ratio_dev()
                self._optimizer_step()
        stats = acc.result()
        stats["ratio_first_step_max_dev"] = first_ratio_dev if first_ratio_dev is not None else float("nan")
        return stats

    def _step_loss(self, traj, cond, adv, mask, old_logp, mb: slice, k: int, normalizer: float):
        s, t = self.cfg.sampler, self.cfg.train
        x, x_next = traj.latents[mb, k], traj.latents[mb, k + 1]
        sig, sig_next = float(self.sigmas[k]), float(self.sigmas[k + 1])
        v = self.model(x, self._sigma(k, x), cond[mb])
        _, logp, mean, std = self.transition(x, v, sig, sig_next, eta=s.eta, prev=x_next)
        kl = None
        if self.ref is not None:
            with torch.no_grad():
                v_ref = self._ref_velocity(x, k, cond[mb])
                _, _, ref_mean, _ = self.transition(x, v_ref, sig, sig_next, eta=s.eta, prev=x_next)
            kl = kl_to_reference(mean, ref_mean, std, form=t.kl_form, sigma=sig, sigma_next=sig_next)[:, None]
        return policy_loss(
            logp[:, None], old_logp[mb, k][:, None], adv[mb, k][:, None], mask[mb, k][:, None],
            clip_range=t.clip_range, objective=t.objective, kl=kl, kl_coef=t.kl_coef, normalizer=normalizer,
        )

    def _sigma(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Noise level of step k for every sample of ``x``: ``[b]`` on x's device."""
        return self.sigmas[k].expand(x.shape[0]).to(x.device)

    def _ref_velocity(self, x: torch.Tensor, k: int, cond: Any) -> torch.Tensor:
        """Velocity of the initial policy: the trainable weights replaced by their snapshot for this call only."""
        ref = {f"policy.{n}": w for n, w in self.ref.items()}
        sigma = self._sigma(k, x)
        return torch.func.functional_call(self.velocity_module, ref, (x, sigma, cond), strict=False)

    def _optimizer_step(self) -> None:
        t = self.cfg.train
        if t.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), t.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            with torch.no_grad():
                for n, p in self.params.items():
                    self.ema[n].lerp_(p.detach(), 1.0 - t.ema_decay)

    # ------------------------------------------------------------------ eval, logging, checkpoints

    def evaluate(self, tag: str | None) -> EvalResult:
        e, s = self.cfg.eval, self.cfg.sampler
        with self.swapped(self.ema), self.eval_mode():
            res = evaluate_policy(
                self.policy, self.rewards, self.eval_prompts, samples_per_prompt=e.samples_per_prompt,
                num_steps=s.eval_steps, shift=s.shift, schedule=s.schedule, seed=e.seed, suite=e.metrics,
                micro_batch=self.cfg.train.micro_batch * 2,
                velocity=self.model,
            )
        if tag is not None and self.info.is_main and self.cfg.plots:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_grid(res.pixels, res.prompts, self.run_dir / f"samples_{tag}.png", per_row=e.samples_per_prompt * 2,
                      title=f"{tag} training ({self.cfg.train.scheme})")
        return res

    def log(self, it: int, rewards, credit: CreditOutput, mask, stats: dict[str, float], elapsed: float) -> dict[str, float]:
        inputs, out = self._global_credit
        r = inputs.rewards
        row: dict[str, float] = {"iteration": it, "wall_seconds": elapsed}
        for k, name in enumerate(self.rewards.names):
            row[f"reward/{name}"] = float(r[:, k].mean())
        row.update({f"credit/{k}": float(v) for k, v in out.metrics.items()})
        row["credit/zero_variance_groups"] = zero_variance_groups(r, inputs.group_ids)
        row.update({f"train/{k}": v for k, v in stats.items()})
        profile = step_weight_profile(out.weights, inputs.mask)
        self.weight_profiles.append([round(float(w), 5) for w in profile])
        if self.info.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            w = self._tb()
            for k, v in row.items():
                if k != "iteration":
                    w.add_scalar(k, v, it)
        return row

    def log_eval(self, it: int, metrics: dict[str, float]) -> None:
        if not self.info.is_main:
            return
        with open(self.run_dir / "eval.jsonl", "a") as f:
            f.write(json.dumps({"iteration": it, **metrics}) + "\n")
        w = self._tb()
        for k, v in metrics.items():
            w.add_scalar(f"eval/{k}" if not k.startswith("eval/") else k, v, it)

    def save(self, iteration: int) -> None:
        """Every rank takes part (FSDP2 gathers whole tensors); the main process writes."""
        weights = {n: _whole(p) for n, p in self.params.items()}
        ema = {n: _whole(t) for n, t in self.ema.items()} if self.ema is not None else None
        optim = self._optimizer_state()
        if self.info.is_main:
            save_checkpoint(
                self.run_dir, iteration, weights, optim,
                {"weight_profiles": self.weight_profiles, "seed": self.cfg.seed}, ema=ema,
            )
        odist.barrier(self.info)

    def _optimizer_state(self) -> dict:
        """The optimizer state with whole tensors (FSDP2 shards are gathered: a collective on every rank)."""
        state = self.optimizer.state_dict()
        if self.fsdp:
            state["state"] = {i: {k: _whole(v) for k, v in st.items()} for i, st in state["state"].items()}
        return state

    def _load_optimizer_state(self, state: dict) -> None:
        if self.fsdp:  # re-shard each moment like its parameter
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            state["state"] = {
                i: {k: v if v.dim() == 0 else _like(v, params[int(i)]) for k, v in st.items()}
                for i, st in state["state"].items()
            }
        self.optimizer.load_state_dict(state)

    def _run_diagnostics(self) -> dict[str, float]:
        """Credit and PPO diagnostics averaged over the run's iterations (from metrics.jsonl)."""
        path = self.run_dir / "metrics.jsonl"
        rows = [json.loads(l) for l in path.read_text().splitlines() if l] if path.is_file() else []
        keys = [k for k in (rows[0] if rows else {}) if k.startswith(("credit/", "train/clip_frac", "train/approx_kl"))]
        out = {f"mean_{k}": sum(r[k] for r in rows) / len(rows) for k in keys}
        if rows:
            out["max_train/ratio_first_step_max_dev"] = max(r["train/ratio_first_step_max_dev"] for r in rows)
        return out

    def write_plots(self) -> None:
        rows = [json.loads(l) for l in (self.run_dir / "metrics.jsonl").read_text().splitlines() if l]
        keys = [f"reward/{n}" for n in self.rewards.names]
        plot_curves(rows, keys, self.run_dir, prefix="curve")
        plot_weight_heatmap(self.weight_profiles, self.run_dir / "credit_weights.png")

    # ------------------------------------------------------------------ small context helpers

    def _tb(self):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tb"))
        return self.writer

    def _progress(self):
        if not (self.cfg.progress and self.info.is_main):
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.train.iterations, initial=self.start_iteration, desc=f"otca {self.cfg.train.scheme}")

    def _no_sync(self, skip_sync: bool):
        if skip_sync and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(not skip_sync)
        return nullcontext()

    def eval_mode(self):
        return _EvalMode(self.policy)

    def swapped(self, weights: dict[str, torch.Tensor] | None):
        return _Swapped(self.params, weights)


class _EvalMode:
    """Run a module in eval mode for the duration of a block (restores the previous mode)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __enter__(self):
        self.was_training = self.module.training
        self.module.eval()

    def __exit__(self, *exc):
        self.module.train(self.was_training)


class _Swapped:
    """Temporarily load other values (EMA, reference) into the trainable parameters."""

    def __init__(self, params: dict[str, torch.nn.Parameter], weights: dict[str, torch.Tensor] | None):
        self.params, self.weights = params, weights

    def __enter__(self):
        if self.weights is None:
            return
        self.saved = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.weights[n])

    def __exit__(self, *exc):
        if self.weights is None:
            return
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.saved[n])


def _whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP2-sharded DTensor) parameter, detached."""
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _like(whole: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``whole`` laid out like parameter ``p``: sharded the same way when ``p`` is an FSDP2 DTensor."""
    if hasattr(p, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(whole.to(p.device, p.dtype), p.device_mesh, p.placements)
    return whole.to(p.device, p.dtype)


def _chunks(part: slice, size: int) -> list[slice]:
    return [slice(i, min(i + size, part.stop)) for i in range(part.start, part.stop, size)]


class _MetricAccumulator:
    """Count-weighted means of the loss metrics over the calls of an update."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.n = 0
        self.rmin, self.rmax = float("inf"), float("-inf")

    def add(self, m: dict[str, float], n: int) -> None:
        if n == 0:
            return
        self.n += n
        for k, v in m.items():
            if k in ("ratio_min", "ratio_max", "num_trained"):
                continue
            self.sums[k] = self.sums.get(k, 0.0) + v * n
        self.rmin = min(self.rmin, m["ratio_min"])
        self.rmax = max(self.rmax, m["ratio_max"])

    def ratio_dev(self) -> float:
        return max(abs(self.rmin - 1.0), abs(self.rmax - 1.0)) if self.n else float("nan")

    def result(self) -> dict[str, float]:
        out = {k: v / max(self.n, 1) for k, v in self.sums.items()}
        out.update(ratio_min=self.rmin, ratio_max=self.rmax)
        return out
