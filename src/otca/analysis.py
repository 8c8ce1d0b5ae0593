"""Is TCD's similarity gain a faithful proxy for a step's contribution? The paper's Sec. 6.1 (Table 5, Fig. 6).

For sampled trajectories we decode the clean prediction ``x0_hat`` of every state, score it with every
training reward, and compare the per-step reward gains ``dR`` with TCD's similarity gains ``dS``:

    R[i, k, j] = reward_j(decode(predict_x0(latents[i, k], v(latents[i, k], sigma_k), sigma_k)))   k = 0..T
    dR[i, k, j] = R[i, k+1, j] - R[i, k, j]                                 # transition k, like dS (Eq. 7)

``dS`` is :func:`otca.credit.tcd_gains` on the same trajectories (our reading of Eq. 7, docs/design.md). What
is decoded is a registered *view* of each state (:data:`VIEWS`): ``x0`` (default) the clean prediction above,
which a reward model can judge at any noise level, or ``state`` the noisy state itself, the paper's literal
"decode the intermediate latent Z_t" (its reward then mostly measures how much noise is left). The
comparison is made for each reward and for their sum after z-scoring each (:func:`zscore_sum`). Steps are
the transitions TCD weighs in the run: all ``T``, or ``T - 1`` when the run drops the last step
(``train.drop_last_step``).

Every metric is computed per trajectory over its steps and then summarised over trajectories
(:func:`summarize`): mean, population std, and the number of trajectories where it is defined.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from otca.registry import Registry

# metric -> its range, in the order of the paper's Table 5
METRIC_RANGES = {
    "pearson": "[-1, 1]",
    "spearman": "[-1, 1]",
    "pairwise_order_agreement": "[0, 1]",
    "recall@3": "[0, 1]",
    "recall@5": "[0, 1]",
    "argmax_distance": "[0, T-1]",
    "pearson_pooled": "[-1, 1]",
}
ZSUM = "z-sum"


# ------------------------------------------------------------------ pure metric functions


def reward_gains(scores: torch.Tensor) -> torch.Tensor:
    """Per-transition reward gains ``dR_k = R_{k+1} - R_k``: ``scores [N, T+1, ...] -> [N, T, ...]``.

    The same differencing as TCD's Eq. 7 (our reading), so ``dR[:, k]`` and ``dS[:, k]`` both belong to
    transition ``k`` (``latents[:, k] -> latents[:, k+1]``).
    """
    return scores[:, 1:] - scores[:, :-1]  # [N, T, ...]


def zscore_sum(scores: torch.Tensor) -> torch.Tensor:
    """``scores [N, S, K] -> [N, S]``: each objective standardised over all of its ``N*S`` values, then summed.

    Standardising puts objectives with different units on one scale before adding them; an objective with
    no spread contributes 0. (A per-objective mean shift does not change gains; only the scale matters.)
    """
    flat = scores.double().reshape(-1, scores.shape[-1])  # [N*S, K]
    z = (scores.double() - flat.mean(0)) / flat.std(0, unbiased=False).clamp_min(1e-12)  # [N, S, K]
    return z.sum(-1)  # [N, S]


def pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row of ``a, b [N, T]``: ``[N]`` float64; NaN where a row is constant."""
    a, b = a.double(), b.double()
    a = a - a.mean(1, keepdim=True)  # [N, T]
    b = b - b.mean(1, keepdim=True)  # [N, T]
    den = torch.linalg.vector_norm(a, dim=1) * torch.linalg.vector_norm(b, dim=1)  # [N]
    return torch.where(den > 0, (a * b).sum(1) / den, torch.full_like(den, math.nan))  # [N]


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks within each row of ``x [N, T]``, ties given their average rank (scipy's 'average')."""
    below = (x[:, None, :] < x[:, :, None]).sum(2)  # [N, T]: entries strictly smaller than x[:, k]
    equal = (x[:, None, :] == x[:, :, None]).sum(2)  # [N, T]: entries equal to x[:, k], itself included
    return below.double() + (equal.double() + 1) / 2  # [N, T]


def spearman_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman correlation of each row: the Pearson correlation of the average ranks ``[N]``."""
    return pearson_rows(average_ranks(a), average_ranks(b))  # [N]


def order_agreement_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise order agreement ``[N]``: the fraction of step pairs ``j < k`` ordered the same way by ``a`` and
    ``b``, i.e. ``sign(a_j - a_k) == sign(b_j - b_k)`` (a tie agrees only with a tie). Without ties it is
    ``(1 + Kendall's tau) / 2``."""
    T = a.shape[1]
    sa = torch.sign(a[:, :, None] - a[:, None, :])  # [N, T, T]
    sb = torch.sign(b[:, :, None] - b[:, None, :])  # [N, T, T]
    upper = torch.ones(T, T, dtype=torch.bool, device=a.device).triu(1)  # [T, T] pairs j < k
    return (sa == sb)[:, upper].double().mean(1)  # [N]


def top_k(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[N, k]`` of the ``k`` largest entries of each row; ties go to the earlier step."""
    return torch.sort(x, dim=1, descending=True, stable=True).indices[:, :k]  # [N, k]


def recall_at_k_rows(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """Recall@k ``[N]``: ``|topk(a) ∩ topk(b)| / k`` for each row (``1 <= k <= T``)."""
    if not 1 <= k <= a.shape[1]:
        raise ValueError(f"recall@k: expected 1 <= k <= T={a.shape[1]}, got k={k}")
    hits = top_k(a, k)[:, :, None] == top_k(b, k)[:, None, :]  # [N, k, k]
    return hits.any(2).double().sum(1) / k  # [N]


def argmax_distance_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|argmax a - argmax b|`` in steps for each row ``[N]`` (the first maximum on ties)."""
    return (a.argmax(1) - b.argmax(1)).abs().double()  # [N]


@dataclass(frozen=True)
class Stat:
    """A per-trajectory metric summarised over trajectories: mean, population std, and the count ``n`` of
    trajectories where it is defined (a correlation is undefined on a constant row)."""

    mean: float
    std: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.4f}" if math.isnan(self.std) else f"{self.mean:.4f} ± {self.std:.3f}"


def summarize(values: torch.Tensor) -> Stat:
    """Mean and population std of the finite entries of ``values [N]`` (NaN, 0 when there are none)."""
    v = values[torch.isfinite(values)].double()  # [n]
    if v.numel() == 0:
        return Stat(math.nan, math.nan, 0)
    return Stat(float(v.mean()), float(v.std(unbiased=False)), int(v.numel()))


def proxy_metrics(dS: torch.Tensor, dR: torch.Tensor, ks: Sequence[int] = (3, 5)) -> dict[str, Stat]:
    """Table 5 for one reward: how well the gains ``dS [N, T]`` track the reward gains ``dR [N, T]``.

    - ``pearson`` / ``spearman``: per-trajectory correlation over the steps;
    - ``pairwise_order_agreement``: :func:`order_agreement_rows`;
    - ``recall@k``: :func:`recall_at_k_rows` for each ``k`` in ``ks`` below T (at ``k = T`` it is always 1);
    - ``argmax_distance``: :func:`argmax_distance_rows`;
    - ``pearson_pooled``: one Pearson correlation over all ``N*T`` (trajectory, step) pairs (``n = N*T``,
      std NaN: a single value): the paper's "global correlation" reading, beside the per-trajectory mean.
    """
    if dS.shape != dR.shape or dS.dim() != 2:
        raise ValueError(f"dS, dR: expected two [N, T] tensors, got {list(dS.shape)} and {list(dR.shape)}")
    out = {
        "pearson": summarize(pearson_rows(dS, dR)),
        "spearman": summarize(spearman_rows(dS, dR)),
        "pairwise_order_agreement": summarize(order_agreement_rows(dS, dR)),
    }
    for k in ks:
        if k < dS.shape[1]:
            out[f"recall@{k}"] = summarize(recall_at_k_rows(dS, dR, k))
    out["argmax_distance"] = summarize(argmax_distance_rows(dS, dR))
    pooled = pearson_rows(dS.reshape(1, -1), dR.reshape(1, -1))  # [1]
    out["pearson_pooled"] = Stat(float(pooled[0]), math.nan, dS.numel())
    return out


# ------------------------------------------------------------------ traces of sampled trajectories

# view(velocity, x [b, *latent], sigma, cond, micro_batch) -> the latent [b, *latent] that is decoded and scored;
# velocity(x, sigma [b], cond) is the one the rollout used
View = Callable[[Callable, torch.Tensor, float, Any, int], torch.Tensor]
VIEWS: Registry[View] = Registry("decoded view")


@VIEWS.register("x0")
def clean_prediction_view(velocity: Callable, x: torch.Tensor, sigma: float, cond: Any, micro_batch: int) -> torch.Tensor:
    """``x0_hat = x - sigma * v(x, sigma)`` (the policy's clean prediction at this state)."""
    from otca.flow import predict_x0
    from otca.rollout import velocity_in_chunks

    sig = torch.full((x.shape[0],), sigma, device=x.device)  # [b]
    return predict_x0(x, velocity_in_chunks(velocity, x, sig, cond, micro_batch), sigma)  # [b, *latent]


@VIEWS.register("state")
def state_view(velocity: Callable, x: torch.Tensor, sigma: float, cond: Any, micro_batch: int) -> torch.Tensor:
    """The noisy state itself (the paper's literal reading of Sec. 6.1)."""
    return x


@dataclass
class CreditTrace:
    """What the analysis needs from sampled trajectories (all on CPU, fp32)."""

    gains: torch.Tensor  # [N, T] TCD similarity gains dS
    scores: torch.Tensor  # [N, T+1, K] reward of the decoded view of every state
    reward_names: list[str]  # [K]
    prompts: list[str]  # [N]
    steps: int  # transitions analysed: the first `steps` of T (T, or T-1 when the run drops the last)
    view: str  # what was decoded (a name in VIEWS)

    def targets(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{reward name or 'z-sum': (dS [N, steps], dR [N, steps])}``."""
        dS = self.gains[:, : self.steps]  # [N, steps]
        per = {n: reward_gains(self.scores[..., j])[:, : self.steps] for j, n in enumerate(self.reward_names)}
        per[ZSUM] = reward_gains(zscore_sum(self.scores))[:, : self.steps].float()  # [N, steps]
        return {name: (dS, dR) for name, dR in per.items()}


@torch.no_grad()
def trace_trajectories(trainer: Any, n: int, view: str = "x0") -> CreditTrace:
    """Sample ``n`` trajectories with the trainer's own phases (its prompts, sampler, seeds and weights) and
    score the decoded ``view`` of every state with its rewards.

    Batches are the trainer's iterations ``0, 1, ...`` (one global batch each); the first ``n`` samples are kept.
    """
    from otca.credit import tcd_gains

    see = VIEWS.get(view)
    gains, scores, prompts = [], [], []
    micro = trainer.cfg.train.micro_batch
    it = 0
    while sum(len(p) for p in prompts) < n:
        batch = trainer.sample_prompts(it)
        traj, cond = trainer.rollout(batch, it)
        per_state = []
        with trainer.eval_mode():
            for k, sigma in enumerate(traj.sigmas.tolist()):  # T+1 states
                shown = see(trainer.model, traj.latents[:, k], sigma, cond, micro)  # [b, *latent]
                pixels = trainer.policy.decode(shown).float().clamp(0, 1)
                per_state.append(trainer.rewards(pixels, batch.prompts))  # [b, K]
        scores.append(torch.stack(per_state, 1))  # [b, T+1, K]
        gains.append(tcd_gains(traj.latents, traj.final).cpu())  # [b, T]
        prompts.append(batch.prompts)
        it += 1
    T = gains[0].shape[1]
    steps = T - 1 if trainer.cfg.train.drop_last_step and T > 1 else T
    return CreditTrace(
        gains=torch.cat(gains)[:n],
        scores=torch.cat(scores)[:n],
        reward_names=list(trainer.rewards.names),
        prompts=[p for ps in prompts for p in ps][:n],
        steps=steps,
        view=view,
    )


def analyze_trace(trace: CreditTrace) -> dict[str, dict[str, Stat]]:
    """:func:`proxy_metrics` for every reward and for the z-scored sum: ``{target: {metric: Stat}}``."""
    return {name: proxy_metrics(dS, dR) for name, (dS, dR) in trace.targets().items()}


# ------------------------------------------------------------------ reports


def format_table(results: dict[str, dict[str, Stat]], steps: int) -> str:
    """The paper's Table 5 as Markdown: one row per metric, one column per target (mean ± std)."""
    targets = list(results)
    lines = [
        "| metric | range | " + " | ".join(targets) + " |",
        "|---|---|" + "---|" * len(targets),
    ]
    for metric, rng in METRIC_RANGES.items():
        if metric not in results[targets[0]]:
            continue
        cells = [str(results[t][metric]) for t in targets]
        lines.append(f"| {metric} | {rng.replace('T-1', str(steps - 1))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_examples(trace: CreditTrace, path: Path, examples: int = 6) -> None:
    """Fig. 6: ``dS`` and the z-scored reward gain against the step for ``examples`` trajectories evenly
    spaced through the trace (so different prompts; not hand-picked), plus a scatter of every (dS, dR) pair."""
    from otca.diagnostics import pyplot

    plt = pyplot()
    dS, dR = trace.targets()[ZSUM]  # [N, steps] each
    n = min(examples, dS.shape[0])
    cols = 3
    rows = math.ceil((n + 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), dpi=100, squeeze=False)
    steps = torch.arange(dS.shape[1])
    r = pearson_rows(dS, dR)  # [N]
    picks = torch.linspace(0, dS.shape[0] - 1, n).round().long().tolist()  # [n] trajectory indices
    for i, ax in enumerate(axes.flat):
        if i > n:
            ax.axis("off")
            continue
        if i == n:
            ax.scatter(dS.flatten(), dR.flatten(), s=4, alpha=0.4)
            ax.set_xlabel("dS (TCD similarity gain)")
            ax.set_ylabel("dR (z-scored reward gain)")
            ax.set_title(f"all {dS.shape[0]} trajectories", fontsize=8)
            continue
        j = picks[i]
        ax.plot(steps, dS[j], "o-", ms=3, color="tab:blue", label="dS")
        ax.set_ylabel("dS", color="tab:blue")
        twin = ax.twinx()
        twin.plot(steps, dR[j], "s--", ms=3, color="tab:orange", label="dR")
        twin.set_ylabel("dR (z-sum)", color="tab:orange")
        ax.set_xlabel("step k (0 = from noise)")
        ax.set_title(f"#{j} {trace.prompts[j][:32]}  r={float(r[j]):.2f}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(trace: CreditTrace, results: dict[str, dict[str, Stat]], out_dir: Path, examples: int,
                 meta: dict[str, Any]) -> None:
    """``analysis.json`` (every Stat and ``meta``), ``analysis.md`` (the table) and ``analysis.png`` (Fig. 6)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        **meta,
        "trajectories": trace.gains.shape[0],
        "steps": trace.steps,
        "view": trace.view,
        "results": {t: {m: asdict(s) for m, s in ms.items()} for t, ms in results.items()},
    }
    (out_dir / "analysis.json").write_text(json.dumps(payload, indent=1))
    head = (f"TCD similarity gain dS against the reward gain dR of the decoded view '{trace.view}' of each state, "
            f"{trace.gains.shape[0]} trajectories x {trace.steps} steps (mean ± std over trajectories).\n\n")
    (out_dir / "analysis.md").write_text(head + format_table(results, trace.steps) + "\n")
    plot_examples(trace, out_dir / "analysis.png", examples)


@dataclass
class CreditAnalysis:
    """What :func:`analyze_credit` measured and where it wrote the report."""

    results: dict[str, dict[str, Stat]]  # {target: {metric: Stat}}
    trace: CreditTrace
    out_dir: Path


def load_policy_trainer(
    config: str | None, overrides: Sequence[str], run_dir: str | None, out_dir: Path
) -> tuple[Any, dict[str, str]]:
    """A Trainer for a run (its ``config.yaml``, the latest checkpoint's raw weights, not the EMA: training
    rollouts use the raw weights) or for a config's policy with its base weights; and where both came from."""
    from otca.checkpoint import latest_checkpoint, load_checkpoint
    from otca.config import load_config
    from otca.trainer import Trainer

    if run_dir is not None and config is not None:
        raise ValueError("analyze-credit: give a run directory or a config, not both (the run has its config.yaml)")
    source = Path(run_dir) / "config.yaml" if run_dir is not None else config
    cfg = load_config(source, [*overrides, f"out_dir={out_dir}", "progress=false"])
    trainer = Trainer(cfg, out_dir)
    weights = "base"
    if run_dir is not None:
        ckpt = latest_checkpoint(Path(run_dir))
        state = load_checkpoint(ckpt)["weights"]
        missing = sorted(set(trainer.params) - set(state))
        if missing:
            raise ValueError(f"checkpoint '{ckpt}' does not match the model: no tensor '{missing[0]}'")
        with torch.no_grad():
            for name, p in trainer.params.items():
                p.copy_(state[name])
        weights = str(ckpt)
    return trainer, {"source": str(source) if source else "defaults", "weights": weights}


def analyze_credit(
    config: str | None = None,
    overrides: Sequence[str] = (),
    *,
    run_dir: str | None = None,
    trajectories: int = 512,
    view: str = "x0",
    out_dir: str | None = None,
    examples: int = 6,
) -> CreditAnalysis:
    """Sec. 6.1 on a run or on a config's policy (:func:`load_policy_trainer`), with the run's sampler.

    Writes the report to ``out_dir`` (default ``RUN_DIR/credit_analysis``, or ``runs/credit-analysis``).
    """
    from otca.compare import provenance

    VIEWS.get(view)  # an unknown view fails before any model is built
    if trajectories < 1:
        raise ValueError(f"trajectories: expected >= 1, got {trajectories}")
    out = Path(out_dir or (Path(run_dir) / "credit_analysis" if run_dir is not None else "runs/credit-analysis"))
    trainer, where = load_policy_trainer(config, overrides, run_dir, out)
    trace = trace_trajectories(trainer, trajectories, view)
    results = analyze_trace(trace)
    s = trainer.cfg.sampler
    meta = {**where, "overrides": list(overrides), "scheme_of_run": trainer.cfg.train.scheme,
            "num_steps": s.num_steps, "sde": s.sde, "eta": s.eta, "final_latent": s.final_latent, **provenance()}
    write_report(trace, results, out, examples, meta)
    return CreditAnalysis(results, trace, out)
