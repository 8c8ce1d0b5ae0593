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

The package in three parts: :mod:`~otca.analysis.metrics` (pure functions of ``dS`` and ``dR``),
:mod:`~otca.analysis.trace` (sampling and scoring the trajectories) and :mod:`~otca.analysis.report` (the
driver, table and report files).
"""
from otca.analysis.metrics import (
    METRIC_RANGES,
    ZSUM,
    Stat,
    argmax_distance_rows,
    average_ranks,
    order_agreement_rows,
    pearson_rows,
    proxy_metrics,
    recall_at_k_rows,
    reward_gains,
    spearman_rows,
    summarize,
    top_k,
    zscore_sum,
)
from otca.analysis.report import (
    CreditAnalysis,
    analyze_credit,
    analyze_trace,
    format_table,
    load_policy_trainer,
    write_report,
)
from otca.analysis.trace import VIEWS, CreditTrace, View, clean_prediction_view, state_view, trace_trajectories

__all__ = [
    "METRIC_RANGES",
    "VIEWS",
    "ZSUM",
    "CreditAnalysis",
    "CreditTrace",
    "Stat",
    "View",
    "analyze_credit",
    "analyze_trace",
    "argmax_distance_rows",
    "average_ranks",
    "clean_prediction_view",
    "format_table",
    "load_policy_trainer",
    "order_agreement_rows",
    "pearson_rows",
    "proxy_metrics",
    "recall_at_k_rows",
    "reward_gains",
    "spearman_rows",
    "state_view",
    "summarize",
    "top_k",
    "trace_trajectories",
    "write_report",
    "zscore_sum",
]
