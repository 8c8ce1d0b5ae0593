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
from otca.batching import update_parts
from otca.checkpoint import NoCheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from otca.config import RunConfig, dump_config, window_spec
from otca.credit import (
    CreditInputs,
    CreditOutput,
    ema_profile,
    gain_profile,
    get_scheme,
    scale_advantages,
    scheme_needs,
    tcd_gains,
)
from otca.diagnostics import LossMetrics, run_diagnostics, step_weight_profile, zero_variance_groups
from otca.evaluate import EvalResult, evaluate_policy, load_prompts
from otca.faults import fault_point
from otca.flow import (
    RATIO_GUARDS,
    StepGeometry,
    get_transition,
    kl_to_reference,
    make_sigmas,
    policy_loss,
    sde_window,
    window_train_mask,
)
from otca.models.registry import build_policy
from otca.monitor import alarm_metrics, drift_alarms
from otca.plots import plot_curves, plot_weight_heatmap, save_grid
from otca.rewards.registry import build_reward_set
from otca.rollout import (
    STREAM_PROMPTS,
    STREAM_SDE_WINDOW,
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
        self.window = window_spec(cfg)  # the SDE window's WindowSpec (None: every step stochastic)
        self.guard = RATIO_GUARDS.get(cfg.train.ratio_guard)
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
        # what a resumed run takes from its checkpoint rather than recomputing (docs/design.md, "Resume")
        self.eval_before: dict[str, float] | None = None
        self.wall_before = 0.0  # wall seconds spent by the interrupted runs before this process
        self._t0 = time.time()
        self._saved_at = -1  # iteration of the newest checkpoint that holds the current weights
        self._iteration = 0  # the iteration in progress (for fault points)
        self.eval_history: list[dict[str, float]] = []  # the monitor's evaluations, before training first
        self.alarmed = False  # the latest monitored evaluation raised a drift alarm
        self.gain_profile: torch.Tensor | None = None  # [K, T] running mean of the measured step gains

    def resume(self, fresh_if_none: bool = False) -> None:
        """Continue from the newest sound checkpoint of ``run_dir``: weights, EMA, optimizer, loop state, the
        evaluation before training, the elapsed wall time, and the logs cut back to where the checkpoint left them.

        ``fresh_if_none``: a run directory with no checkpoint yet (killed before its first one) starts over from
        iteration 0 (its logs emptied) instead of failing.
        """
        try:
            ckpt = latest_checkpoint(self.run_dir, with_weights=False)
        except NoCheckpointError:
            if not fresh_if_none:
                raise
            if self.info.is_main:
                print(f"otca: no checkpoint yet in '{self.run_dir}': starting from iteration 0", file=sys.stderr)
            self.runlog.restore({})
            return
        ck = load_checkpoint(ckpt)
        if ck["weights"] is not None:
            missing = set(self.params) ^ set(ck["weights"])
            if missing:
                raise ValueError(f"checkpoint does not match the model: {len(missing)} mismatched tensors, "
                                 f"e.g. {sorted(missing)[0]}")
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(odist.like(ck["weights"][n], p))
        if self.ema is not None and ck["ema"] is not None:
            self.ema = {n: odist.like(t, self.params[n]) for n, t in ck["ema"].items()}
        if ck["optimizer"] is not None:
            odist.load_optimizer_state(self.optimizer, ck["optimizer"], self.fsdp)
        state = ck["state"]
        self.start_iteration = self._saved_at = state["iteration"]
        self.weight_profiles = state.get("weight_profiles", [])
        if state.get("gain_profile") is not None:
            self.gain_profile = torch.tensor(state["gain_profile"], dtype=torch.float32)
        self.eval_before = state.get("eval_before")
        self.wall_before = state.get("wall_seconds", 0.0)
        if "log_positions" in state:
            self.runlog.restore(state["log_positions"], state.get("pending_row"))
        else:  # a checkpoint written before log positions were recorded
            self.eval_before = self.eval_before or (self.runlog.summary() or {}).get("eval_before")
            self.wall_before = self.wall_before or (self.runlog.summary() or {}).get("wall_seconds", 0.0)
            self.runlog.truncate(self.start_iteration)

    # ------------------------------------------------------------------ the loop

    def elapsed(self) -> float:
        """Wall seconds of the run so far, the interrupted processes' time included."""
        return self.wall_before + time.time() - self._t0

    def train(self) -> dict[str, Any]:
        cfg, n_iter = self.cfg, self.cfg.train.iterations
        self._t0 = time.time()
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        if self.eval_before is None:
            self.eval_before = self.evaluate("before").metrics
            fault_point("before", self.start_iteration)
            if self.start_iteration == 0:  # state only: "before" and the wall time survive a kill from here on
                self.save(0, weights=False)
        eval_before = self.eval_before
        self._check_monitor_signals(eval_before)
        start = self.start_iteration
        self.eval_history = [{"iteration": 0, **eval_before}, *self.runlog.eval_rows()]
        if self._eval_due(start) and [r["iteration"] for r in self.runlog.eval_rows()[-1:]] != [start]:
            # the checkpoint was the end of a shorter run, whose final evaluation was cut from the logs
            self.monitored_eval(start)
        bar = self._progress()
        for it in range(start, n_iter):
            self._iteration = it
            torch.manual_seed(seeded_generator(cfg.seed, it, _STREAM_GLOBAL_RNG, 0).initial_seed())
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
            row = self.log_row(it, credit, stats, self.elapsed())
            if self._eval_due(it + 1):
                with timed(times, "eval"):
                    row.update(self.monitored_eval(it + 1, bar))
            if cfg.checkpoint_every and (it + 1) % cfg.checkpoint_every == 0:
                with timed(times, "checkpoint"):
                    self.save(it + 1, pending={**row, **times})
            self.runlog.append({**row, **times})
            fault_point("log", it)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k.split("/")[-1][:10]: f"{v:.3f}" for k, v in row.items() if k.startswith("reward/")}
                                | ({"DRIFT": "!"} if self.alarmed else {}))
        if bar is not None:
            bar.close()
        if self._saved_at != n_iter:
            self.save(n_iter)
        after = self.evaluate("after")
        fault_point("after", n_iter)
        summary = {
            "scheme": cfg.train.scheme,
            "iterations": n_iter,
            "eval_before": eval_before,
            "eval_after": after.metrics,
            "wall_seconds": self.elapsed(),
            "world_size": self.info.world_size,
            "diagnostics": run_diagnostics(self.runlog.rows()) if self.info.is_main else {},
        }
        self.runlog.append_eval(n_iter, after.metrics)
        self.runlog.write_summary(summary)
        fault_point("summary", n_iter)
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
                micro_batch=self.cfg.train.micro_batch, velocity=self.model, keep_x0=self.measures_step_rewards(it),
                sde_steps=self.sde_steps(it), keep_means=self.guard.needs_geometry,
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
        window = self.sde_steps(it)  # [T] bool or None
        if window is not None:  # only the window's (stochastic) steps are trained
            mask_global = window_train_mask(window, mask_global)  # [B, T]
        dev = info.device
        gains = odist.all_gather_rows(tcd_gains(traj.latents, traj.final).to(dev), info).cpu()  # [B, T] fp32
        step_rewards = profile = None
        if self.measures_step_rewards(it):  # [B, T+1, K], and the running profile [K, T] they update
            step_rewards = odist.all_gather_rows(self.step_rewards(traj, rewards, batch).to(dev), info).cpu()
            self.gain_profile = ema_profile(self.gain_profile, gain_profile(step_rewards, mask_global),
                                            t.step_profile_decay)
        elif "step_rewards" in self.needs:  # an iteration that skips them: the profile of the measured ones
            profile = self.gain_profile
        inputs = CreditInputs(
            rewards=odist.all_gather_rows(rewards.to(dev), info).cpu(),
            group_ids=odist.all_gather_rows(batch.group_ids.to(dev), info).cpu(),
            mask=mask_global,
            sigmas=self.sigmas,
            gains=gains,
            reward_weights=self.reward_weights,
            reward_names=tuple(self.rewards.names),
            step_rewards=step_rewards,
            gain_profile=profile,
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

    def measures_step_rewards(self, it: int) -> bool:
        """Does iteration ``it`` decode and score every state's clean prediction? Only for a scheme that needs
        step rewards, on every ``train.step_rewards_every``-th iteration (the first always)."""
        return "step_rewards" in self.needs and it % self.cfg.train.step_rewards_every == 0

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
        # optimizer steps made of whole rollout micro-batches: every update forward is exactly a rollout forward
        groups = update_parts(b, t.updates_per_iter, t.micro_batch)
        parts = [slice(g[0].start, g[-1].stop) for g in groups]
        steps = [k for k in range(T) if bool(odist.all_reduce_sum(mask[:, k].sum(), info) > 0)]
        acc = LossMetrics()
        first_ratio_dev = None
        for epoch in range(t.inner_epochs):
            for pi, part in enumerate(parts):
                count = odist.all_reduce_sum(mask[part].sum(), info)
                if count == 0:
                    continue
                normalizer = float(count) / info.world_size
                calls = [(mb, k) for mb in groups[pi] for k in steps]
                self.optimizer.zero_grad(set_to_none=True)
                for ci, (mb, k) in enumerate(calls):
                    with odist.no_sync(self.model, skip_sync=ci < len(calls) - 1):
                        loss, m = self._step_loss(traj, cond, adv, mask, old_logp, mb, k, normalizer)
                        loss.backward()
                    acc.add(m, int(mask[mb, k].sum()))
                if epoch == 0 and pi == 0:
                    first_ratio_dev = acc.ratio_dev()
                self._optimizer_step()
                fault_point("update", self._iteration)
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
        geometry = None
        if self.guard.needs_geometry:  # [b, 1] fields; the rollout kept the sampling policy's means
            geometry = StepGeometry.of_step(mean, traj.means[mb, k], std, sig, sig_next)
        return policy_loss(
            logp[:, None], old_logp[mb, k][:, None], adv[mb, k][:, None], mask[mb, k][:, None],
            clip_range=t.clip_range, objective=t.objective, kl=kl, kl_coef=t.kl_coef, normalizer=normalizer,
            ratio_guard=t.ratio_guard, geometry=geometry,
        )

    def sde_steps(self, it: int) -> torch.Tensor | None:
        """Iteration ``it``'s SDE window ``[T]`` bool (stochastic and trained where True), None without a window;
        a random window is drawn from its own stream, the same on every rank."""
        w = self.cfg.sampler.sde_window
        if self.window is None or w is None:
            return None
        return sde_window(self.window, w.mode, it, seeded_generator(self.cfg.seed, it, STREAM_SDE_WINDOW, 0))

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
        fault_point("eval", iteration)
        self.eval_history.append(metrics)
        alarms = drift_alarms(self.eval_history, m.signals, window=m.window, tolerance=m.tolerance)
        columns = alarm_metrics(alarms, m.signals)
        self.alarmed = bool(alarms)
        self.runlog.append_eval(iteration, {**{k: v for k, v in metrics.items() if k != "iteration"}, **columns})
        if self.info.is_main:
            for a in alarms:
                (bar.write if bar is not None else lambda line: print(line, file=sys.stderr))(f"otca: {a}")
        return columns

    def _check_monitor_signals(self, metrics: dict[str, float]) -> None:
        """One console line when the monitor has periodic evaluations but the configured eval suite reports some
        (or none) of ``eval.monitor.signals``: a signal the suite does not report is never watched. Without an
        eval suite (``eval.metrics: null``) the monitor is off by choice and nothing is said."""
        e = self.cfg.eval
        missing = [k for k in e.monitor.signals if k not in metrics]
        if not (e.every and e.metrics and missing and self.info.is_main):
            return
        reported = sorted(k for k in metrics if k.startswith("eval/"))
        what = "the reward-hacking monitor is off" if len(missing) == len(e.monitor.signals) else "not watched"
        print(f"otca: eval.monitor.signals: {missing} not reported by eval.metrics={e.metrics!r} ({what}); it "
              f"reports {reported or 'no eval/ metrics'}", file=sys.stderr)

    def save(self, iteration: int, pending: dict[str, float] | None = None, weights: bool = True) -> None:
        """The checkpoint after ``iteration`` iterations: weights, EMA, optimizer, and all the loop state a resumed
        run needs (the evaluation before training, elapsed wall time, step-weight profiles, the logs' byte positions
        and ``pending``, the log row of the iteration that this checkpoint ends, which is written after it).
        ``weights=False``: state only. Every rank takes part (FSDP2 gathers whole tensors); the main process writes.
        """
        start = time.perf_counter()
        whole = {n: odist.whole(p) for n, p in self.params.items()} if weights else None
        ema = {n: odist.whole(t) for n, t in self.ema.items()} if self.ema is not None and weights else None
        optim = odist.optimizer_state(self.optimizer, self.fsdp) if weights else None
        if self.info.is_main:
            if pending is not None:  # the checkpoint's own time, up to here
                pending = {**pending, "time/checkpoint": pending.get("time/checkpoint", 0.0)
                           + time.perf_counter() - start}
            state = {
                "seed": self.cfg.seed,
                "weight_profiles": self.weight_profiles,
                "gain_profile": None if self.gain_profile is None else self.gain_profile.tolist(),
                "eval_before": self.eval_before,
                "wall_seconds": self.elapsed(),
                "log_positions": self.runlog.positions(),
                "pending_row": pending,
            }
            save_checkpoint(self.run_dir, iteration, whole, optim, state, ema=ema)
        odist.barrier(self.info)
        self._saved_at = iteration

    # ------------------------------------------------------------------ small helpers

    def _eval_due(self, iteration: int) -> bool:
        """Is there an evaluation in the loop after ``iteration`` iterations (the last one has the final eval)?"""
        every = self.cfg.eval.every
        return bool(every) and 0 < iteration < self.cfg.train.iterations and iteration % every == 0

    def _progress(self) -> Any:
        if not (self.cfg.progress and self.info.is_main):
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.train.iterations, initial=self.start_iteration, desc=f"otca {self.cfg.train.scheme}")


_STREAM_GLOBAL_RNG = 1000  # the global torch RNG is reseeded from (seed, iteration, this) at each iteration's start
