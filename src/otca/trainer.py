"""The GRPO loop, as named phases that hand their data to the next:

    sample_prompts -> rollout -> score -> assign_credit -> update -> log (+ evaluate, save when due)

Nothing here knows a scheme, model or reward by name: they come from registries. The same code runs in
one process or under ``torchrun``: each rank rolls out its slice of the global batch, the credit math runs
on the all-gathered rewards and step gains, and DDP (or FSDP2) synchronises the gradients (:mod:`otca.dist`).
The run directory's logs are written through :class:`otca.runlog.RunLog`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from otca import dist as odist
from otca.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from otca.config import RunConfig, dump_config
from otca.credit import CreditInputs, CreditOutput, get_scheme, scale_advantages, scheme_needs, tcd_gains
from otca.diagnostics import LossMetrics, run_diagnostics, step_weight_profile, zero_variance_groups
from otca.evaluate import EvalResult, evaluate_policy, load_prompts
from otca.flow import get_transition, kl_to_reference, make_sigmas, policy_loss
from otca.models.registry import build_policy
from otca.monitor import alarm_metrics, drift_alarms
from otca.plots import plot_curves, plot_weight_heatmap, save_grid
from otca.rewards.registry import build_reward_set
from otca.rollout import (
    STREAM_PROMPTS,
    STREAM_STEP_MASK,
    Trajectory,
    initial_noise,
    sample_sde,
    seeded_generator,
    select_train_steps,
)
from otca.runlog import RunLog, timed
from otca.step_rewards import clean_predictions, score_states
from otca.weights import call_with_weights, eval_mode, swapped


@dataclass
class Batch:
    """This rank's share of one iteration's prompts."""

    prompts: list[str]  # [b] one per sample
    group_ids: torch.Tensor  # [b] global prompt-group index
    indices: list[int]  # [b] global sample index


@dataclass
class Credit:
    """What :meth:`Trainer.assign_credit` hands on: the scheme's view of the global batch, and this rank's share."""

    inputs: CreditInputs  # the gathered global batch [B, ...]
    output: CreditOutput  # the scheme's advantages and weights [B, T], and its metrics
    advantages: torch.Tensor  # [b, T] this rank's rows
    mask: torch.Tensor  # [b, T] bool: this rank's trained transitions


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path | None = None, info: odist.DistInfo | None = None):
        self.cfg = cfg
        self.info = info or odist.init_distributed()
        self.run_dir = Path(run_dir or cfg.out_dir)
        self.runlog = RunLog(self.run_dir, write=self.info.is_main)
        torch.manual_seed(cfg.seed)
        self.policy = build_policy(cfg.model, self.info.device)
        self.rewards = build_reward_set(cfg.rewards)
        self.reward_weights = self.rewards.weights
        self.train_prompts = load_prompts(cfg.prompts.train)
        self.eval_prompts = load_prompts(cfg.prompts.eval)
        self.scheme = get_scheme(cfg.train.scheme)
        self.needs = scheme_needs(self.scheme)  # optional credit inputs the scheme declared (docs/credit-schemes.md)
        self.transition = get_transition(cfg.sampler.sde)  # the one SDE step of the rollout and the update
        self.sigmas = make_sigmas(
            cfg.sampler.num_steps, cfg.sampler.shift, cfg.sampler.schedule,
            dynamic=getattr(self.policy, "dynamic_shift", None),
        )
        if not any(p.requires_grad for p in self.policy.parameters()):
            raise ValueError("model: no trainable parameters")
        if cfg.fsdp and cfg.train.kl_coef > 0:
            raise ValueError("train.kl_coef > 0 is not supported with fsdp=true yet "
                             "(the reference call needs whole weights)")
        autocast = None if cfg.model.autocast == "none" else getattr(torch, cfg.model.autocast)
        self.velocity_module = odist.VelocityModule(self.policy, autocast)
        self.fsdp = cfg.fsdp and self.info.distributed
        self.model = odist.wrap(self.velocity_module, self.info, self.fsdp, cfg.ddp_find_unused_parameters)
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
        self.eval_history: list[dict[str, float]] = []  # the monitor's evaluations, before training first
        self.alarmed = False  # the latest monitored evaluation raised a drift alarm

    def resume(self) -> None:
        """Load the latest checkpoint of ``run_dir``: weights, EMA, optimizer and loop state."""
        ck = load_checkpoint(latest_checkpoint(self.run_dir))
        missing = set(self.params) ^ set(ck["weights"])
        if missing:
            raise ValueError(f"checkpoint does not match the model: {len(missing)} mismatched tensors, "
                             f"e.g. {sorted(missing)[0]}")
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(odist.like(ck["weights"][n], p))
        if self.ema is not None and ck["ema"] is not None:
            self.ema = {n: odist.like(t, self.params[n]) for n, t in ck["ema"].items()}
        odist.load_optimizer_state(self.optimizer, ck["optimizer"], self.fsdp)
        self.start_iteration = ck["state"]["iteration"]
        self.weight_profiles = ck["state"].get("weight_profiles", [])
        self.runlog.truncate(self.start_iteration)

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict[str, Any]:
        cfg, t0 = self.cfg, time.time()
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        prior = (self.runlog.summary() or {}) if self.start_iteration else {}
        eval_before = prior.get("eval_before") or self.evaluate("before").metrics
        self.eval_history = [{"iteration": 0, **eval_before}, *self.runlog.eval_rows()]
        bar = self._progress()
        for it in range(self.start_iteration, cfg.train.iterations):
            times: dict[str, float] = {}
            with timed(times, "rollout"):
                batch = self.sample_prompts(it)
                traj, cond = self.rollout(batch, it)
            with timed(times, "score"):
                rewards = self.score(traj, batch)
            with timed(times, "credit"):
                credit = self.assign_credit(traj, rewards, batch, it)
            with timed(times, "update"):
                stats = self.update(traj, cond, credit)
            row = self.log_row(it, credit, stats, time.time() - t0)
            if cfg.eval.every and (it + 1) % cfg.eval.every == 0 and it + 1 < cfg.train.iterations:
                with timed(times, "eval"):
                    row.update(self.monitored_eval(it + 1, bar))
            if cfg.checkpoint_every and (it + 1) % cfg.checkpoint_every == 0:
                with timed(times, "checkpoint"):
                    self.save(it + 1)
            self.runlog.append({**row, **times})
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k.split("/")[-1][:10]: f"{v:.3f}" for k, v in row.items() if k.startswith("reward/")}
                                | ({"DRIFT": "!"} if self.alarmed else {}))
        if bar is not None:
            bar.close()
        after = self.evaluate("after")
        self.save(cfg.train.iterations)
        summary = {
            "scheme": cfg.train.scheme,
            "iterations": cfg.train.iterations,
            "eval_before": eval_before,
            "eval_after": after.metrics,
            "wall_seconds": time.time() - t0 + prior.get("wall_seconds", 0.0),
            "world_size": self.info.world_size,
            "diagnostics": run_diagnostics(self.runlog.rows()) if self.info.is_main else {},
        }
        self.runlog.append_eval(cfg.train.iterations, after.metrics)
        self.runlog.write_summary(summary)
        if self.info.is_main and cfg.plots:
            plot_curves(self.runlog.rows(), [f"reward/{n}" for n in self.rewards.names], self.run_dir, prefix="curve")
            plot_weight_heatmap(self.weight_profiles, self.run_dir / "credit_weights.png")
        self.runlog.close()
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
        """This rank's trajectories (the sampling policy's log-densities included) and the prompts' conditioning."""
        s = self.cfg.sampler
        cond = self.policy.encode(batch.prompts)
        groups = batch.group_ids.tolist()
        x = initial_noise(self.policy, self.cfg.seed, it, batch.indices, groups, s.same_noise_per_group)
        with eval_mode(self.policy):
            traj = sample_sde(
                self.policy, cond, x, self.sigmas, transition=self.transition, eta=s.eta, seed=self.cfg.seed,
                iteration=it, indices=batch.indices, final_latent=s.final_latent,
                micro_batch=self.cfg.train.micro_batch, velocity=self.model, keep_x0="step_rewards" in self.needs,
            )
        return traj, cond

    def score(self, traj: Trajectory, batch: Batch) -> torch.Tensor:
        """Decode the final latents and score them: ``[b, K]`` (a failing reward raises, naming itself)."""
        with torch.no_grad():
            pixels = self.policy.decode(traj.final).float().clamp(0, 1)
        return self.rewards(pixels, batch.prompts)

    def assign_credit(self, traj: Trajectory, rewards: torch.Tensor, batch: Batch, it: int) -> Credit:
        """The scheme's output on the gathered global batch, and this rank's advantages and mask ``[b, T]``."""
        t, info = self.cfg.train, self.info
        n_global = t.prompts_per_iter * t.group_size
        mask_global = select_train_steps(
            n_global, len(self.sigmas) - 1, fraction=t.timestep_fraction, mode=t.timestep_selection,
            drop_last=t.drop_last_step, generator=seeded_generator(self.cfg.seed, it, STREAM_STEP_MASK, 0),
        )
        dev = info.device
        gains = odist.all_gather_rows(tcd_gains(traj.latents, traj.final).to(dev), info).cpu()  # [B, T] fp32
        step_rewards = None
        if "step_rewards" in self.needs:  # [B, T+1, K]
            step_rewards = odist.all_gather_rows(self.step_rewards(traj, rewards, batch).to(dev), info).cpu()
        inputs = CreditInputs(
            rewards=odist.all_gather_rows(rewards.to(dev), info).cpu(),
            group_ids=odist.all_gather_rows(batch.group_ids.to(dev), info).cpu(),
            mask=mask_global,
            sigmas=self.sigmas,
            gains=gains,
            reward_weights=self.reward_weights,
            reward_names=tuple(self.rewards.names),
            step_rewards=step_rewards,
        )
        out = scale_advantages(self.scheme(inputs, t.credit), mask_global, t.credit.adv_scale)
        if self.cfg.save_credit:
            self.runlog.write_credit(it, {
                "rewards": inputs.rewards, "gains": gains, "mask": inputs.mask.to(torch.uint8),
                "group_ids": inputs.group_ids, "advantages": out.advantages, "weights": out.weights,
                **({"step_rewards": step_rewards} if step_rewards is not None else {}),
            })
        mine = info.shard(n_global)
        return Credit(inputs, out, out.advantages[mine], mask_global[mine])

    def step_rewards(self, traj: Trajectory, rewards: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Rewards of every state's decoded clean prediction ``[b, T+1, K]`` (:mod:`otca.step_rewards`): the
        rollout's kept ``x0_hats`` for states 0..T-1, the last state's own prediction for T; the scored final's
        ``rewards [b, K]`` are reused for the state they belong to instead of being scored again."""
        if traj.x0_hats is None:
            raise ValueError("Trajectory.x0_hats: the scheme needs step_rewards; roll out with keep_x0=True")
        T = traj.sigmas.shape[0] - 1

        def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:  # only if the last sigma is > 0
            return self.policy.velocity(x, sigma, self.policy.encode(batch.prompts))

        def score(latents: torch.Tensor, prompts: Any) -> torch.Tensor:
            return self.rewards(self.policy.decode(latents).float().clamp(0, 1), prompts)

        with eval_mode(self.policy):
            last = clean_predictions(velocity, traj.latents[:, T:], traj.sigmas[T:])  # [b, 1, *latent]
            views = torch.cat([traj.x0_hats, last], dim=1)  # [b, T+1, *latent]
            final_at = T - 1 if self.cfg.sampler.final_latent == "x0" else T
            known = {final_at: rewards} if final_at == T - 1 or float(traj.sigmas[T]) == 0 else {}
            return score_states(views, batch.prompts, score, known=known)

    def update(self, traj: Trajectory, cond: Any, credit: Credit) -> dict[str, float]:
        """Clipped-surrogate steps on this rank's rollouts; gradients averaged over ranks by DDP/FSDP.

        Every rank runs the same sequence of forward/backward calls (one per micro-batch and trained step),
        and each loss is a sum over masked entries divided by the global count / world size, so the
        synchronised gradient is exactly the gradient of the global mean over trained (sample, step) pairs.
        """
        t, info = self.cfg.train, self.info
        dev = info.device
        adv, mask = credit.advantages.to(dev), credit.mask.to(dev)  # [b, T] each
        b, T = adv.shape
        old_logp = traj.log_probs.to(dev)  # [b, T]
        n_parts = t.updates_per_iter
        parts = [slice(i * b // n_parts, (i + 1) * b // n_parts) for i in range(n_parts)]
        steps = [k for k in range(T) if bool(odist.all_reduce_sum(mask[:, k].sum(), info) > 0)]
        acc = LossMetrics()
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
                    with odist.no_sync(self.model, skip_sync=ci < len(calls) - 1):
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
        assert self.ref is not None
        ref = {f"policy.{n}": w for n, w in self.ref.items()}
        return call_with_weights(self.velocity_module, ref, x, self._sigma(k, x), cond)

    def _optimizer_step(self) -> None:
        t = self.cfg.train
        if t.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), t.grad_clip)
        self.optimizer.step()
        if self.ema is not None and t.ema_decay:
            with torch.no_grad():
                for n, p in self.params.items():
                    self.ema[n].lerp_(p.detach(), 1.0 - t.ema_decay)

    # ------------------------------------------------------------------ log, eval, checkpoints

    def log_row(self, it: int, credit: Credit, stats: dict[str, float], elapsed: float) -> dict[str, float]:
        """The iteration's log row (rewards, credit and update metrics); records the step-weight profile."""
        inputs, out = credit.inputs, credit.output
        row: dict[str, float] = {"iteration": it, "wall_seconds": elapsed}
        for k, name in enumerate(self.rewards.names):
            row[f"reward/{name}"] = float(inputs.rewards[:, k].mean())
        row.update({f"credit/{k}": float(v) for k, v in out.metrics.items()})
        row["credit/zero_variance_groups"] = zero_variance_groups(inputs.rewards, inputs.group_ids)
        row.update({f"train/{k}": v for k, v in stats.items()})
        profile = step_weight_profile(out.weights, inputs.mask)
        self.weight_profiles.append([round(float(w), 5) for w in profile])
        return row

    def evaluate(self, tag: str | None) -> EvalResult:
        """The eval suite on the EMA weights (when kept); ``tag``: also a sample grid ``samples_<tag>.png``."""
        e, s = self.cfg.eval, self.cfg.sampler
        with swapped(self.params, self.ema), eval_mode(self.policy):
            res = evaluate_policy(
                self.policy, self.rewards, self.eval_prompts, samples_per_prompt=e.samples_per_prompt,
                num_steps=s.eval_steps, shift=s.shift, schedule=s.schedule, seed=e.seed, suite=e.metrics,
                micro_batch=self.cfg.train.micro_batch * 2, velocity=self.model,
            )
        if tag is not None and self.info.is_main and self.cfg.plots:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_grid(res.pixels, res.prompts, self.run_dir / f"samples_{tag}.png", per_row=e.samples_per_prompt * 2,
                      title=f"{tag} training ({self.cfg.train.scheme})")
        return res

    def monitored_eval(self, iteration: int, bar: Any = None) -> dict[str, float]:
        """A periodic evaluation and the reward-hacking monitor (:mod:`otca.monitor`): the eval row (with
        ``monitor/*`` columns) goes to eval.jsonl, an alarm to the console; returns the ``monitor/*`` columns
        for the iteration's row."""
        m = self.cfg.eval.monitor
        metrics = {"iteration": iteration, **self.evaluate(None).metrics}
        self.eval_history.append(metrics)
        alarms = drift_alarms(self.eval_history, m.signals, window=m.window, tolerance=m.tolerance)
        columns = alarm_metrics(alarms, m.signals)
        self.alarmed = bool(alarms)
        self.runlog.append_eval(iteration, {**{k: v for k, v in metrics.items() if k != "iteration"}, **columns})
        if self.info.is_main:
            for a in alarms:
                (bar.write if bar is not None else lambda line: print(line, file=sys.stderr))(f"otca: {a}")
        return columns

    def save(self, iteration: int) -> None:
        """Every rank takes part (FSDP2 gathers whole tensors); the main process writes."""
        weights = {n: odist.whole(p) for n, p in self.params.items()}
        ema = {n: odist.whole(t) for n, t in self.ema.items()} if self.ema is not None else None
        optim = odist.optimizer_state(self.optimizer, self.fsdp)
        if self.info.is_main:
            save_checkpoint(
                self.run_dir, iteration, weights, optim,
                {"weight_profiles": self.weight_profiles, "seed": self.cfg.seed}, ema=ema,
            )
        odist.barrier(self.info)

    # ------------------------------------------------------------------ small helpers

    def _progress(self) -> Any:
        if not (self.cfg.progress and self.info.is_main):
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.train.iterations, initial=self.start_iteration, desc=f"otca {self.cfg.train.scheme}")


def _chunks(part: slice, size: int) -> list[slice]:
    return [slice(i, min(i + size, part.stop)) for i in range(part.start, part.stop, size)]
