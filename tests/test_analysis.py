"""The Sec. 6.1 proxy-validity metrics against scipy and hand-computed values, and the analysis driver on a tiny run."""

import itertools
import json

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from otca.analysis import (
    ZSUM,
    Stat,
    analyze_credit,
    analyze_trace,
    argmax_distance_rows,
    average_ranks,
    format_table,
    load_policy_trainer,
    order_agreement_rows,
    pearson_rows,
    proxy_metrics,
    recall_at_k_rows,
    reward_gains,
    spearman_rows,
    summarize,
    trace_trajectories,
    zscore_sum,
)

TINY = [
    "train.prompts_per_iter=2",
    "train.group_size=3",
    "train.micro_batch=4",
    "sampler.num_steps=6",
    "sampler.eval_steps=4",
    "eval.samples_per_prompt=1",
    "eval.metrics=null",
]


def rows(seed, n=7, T=9, ties=False):
    g = torch.Generator().manual_seed(seed)
    if ties:
        return torch.randint(0, 4, (n, T), generator=g).float(), torch.randint(0, 4, (n, T), generator=g).float()
    return torch.randn(n, T, generator=g), torch.randn(n, T, generator=g)


def test_pearson_matches_scipy_and_is_nan_on_a_constant_row():
    a, b = rows(0)
    got = pearson_rows(a, b)
    want = [scipy.stats.pearsonr(x, y)[0] for x, y in zip(a.numpy(), b.numpy(), strict=True)]
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)
    assert torch.isnan(pearson_rows(torch.ones(1, 5), torch.arange(5.0)[None]))[0]


def test_average_ranks_and_spearman_match_scipy_with_ties():
    a, b = rows(1, ties=True)
    for x in a:
        np.testing.assert_array_equal(average_ranks(x[None])[0].numpy(), scipy.stats.rankdata(x.numpy()))
    got = spearman_rows(a, b)
    want = [scipy.stats.spearmanr(x, y)[0] for x, y in zip(a.numpy(), b.numpy(), strict=True)]
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)


def test_order_agreement_is_half_one_plus_kendall_tau_without_ties():
    a, b = rows(2)
    want = [(1 + scipy.stats.kendalltau(x, y)[0]) / 2 for x, y in zip(a.numpy(), b.numpy(), strict=True)]
    np.testing.assert_allclose(order_agreement_rows(a, b).numpy(), want, atol=1e-6)


def test_order_agreement_with_ties_matches_a_loop_over_pairs():
    a, b = rows(3, ties=True)
    def sign(v):
        return (v > 0) - (v < 0)
    want = []
    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        pairs = list(itertools.combinations(range(len(x)), 2))
        want.append(sum(sign(x[j] - x[k]) == sign(y[j] - y[k]) for j, k in pairs) / len(pairs))
    np.testing.assert_allclose(order_agreement_rows(a, b).numpy(), want)


def test_recall_at_k_by_hand_and_against_sets():
    a = torch.tensor([[5.0, 4, 3, 2, 1]])
    b = torch.tensor([[1.0, 2, 3, 4, 5]])
    assert recall_at_k_rows(a, b, 3).tolist() == [pytest.approx(1 / 3)]  # {0,1,2} & {4,3,2} = {2}
    assert recall_at_k_rows(a, b, 5).tolist() == [1.0]
    x, y = rows(4)
    for k in (1, 3, 5):
        pairs = zip(x.numpy(), y.numpy(), strict=True)
        want = [len(set(np.argsort(-p)[:k]) & set(np.argsort(-q)[:k])) / k for p, q in pairs]
        np.testing.assert_allclose(recall_at_k_rows(x, y, k).numpy(), want)
    with pytest.raises(ValueError, match="recall@k: expected 1 <= k <= T=5, got k=6"):
        recall_at_k_rows(a, b, 6)


def test_argmax_distance_by_hand_first_maximum_on_ties():
    a = torch.tensor([[0.0, 3, 1], [2, 2, 0]])
    b = torch.tensor([[2.0, 0, 0], [0, 1, 1]])
    assert argmax_distance_rows(a, b).tolist() == [1.0, 1.0]


def test_summarize_skips_nan_and_uses_population_std():
    s = summarize(torch.tensor([1.0, float("nan"), 3.0, 5.0]))
    assert (s.mean, s.n) == (3.0, 3)
    assert s.std == pytest.approx(np.std([1, 3, 5]))
    assert summarize(torch.tensor([float("nan")])).n == 0


def test_reward_gains_and_zscore_sum_by_hand():
    scores = torch.tensor([[[0.0, 10.0], [1.0, 10.0], [3.0, 10.0]]])  # [1, 3, 2]: objective 1 is constant
    assert reward_gains(scores)[0, :, 0].tolist() == [1.0, 2.0]
    z = zscore_sum(scores)  # objective 0: mean 4/3, population std sqrt(14/9); objective 1 contributes 0
    want = (torch.tensor([0.0, 1, 3]) - 4 / 3) / (14 / 9) ** 0.5
    torch.testing.assert_close(z[0], want.double())


def test_a_perfect_proxy_and_a_reversed_one():
    dS, _ = rows(5)
    perfect = proxy_metrics(dS, 2 * dS + 1)
    for m in ["pearson", "spearman", "pairwise_order_agreement", "recall@3", "recall@5", "pearson_pooled"]:
        assert perfect[m].mean == pytest.approx(1.0), m
    assert perfect["argmax_distance"].mean == 0
    reversed_ = proxy_metrics(dS, -dS)
    assert reversed_["pearson"].mean == pytest.approx(-1.0)
    assert reversed_["pairwise_order_agreement"].mean == 0
    # recall@k is only reported below T, where it is not trivially 1
    assert "recall@5" not in proxy_metrics(dS[:, :5], dS[:, :5])


@settings(max_examples=30, deadline=None)
@given(scale=st.floats(0.01, 100), shift=st.floats(-10, 10), seed=st.integers(0, 10_000))
def test_every_metric_is_invariant_to_a_positive_affine_map_of_the_reward(scale, shift, seed):
    dS, dR = (x.double() for x in rows(seed, n=4, T=8))  # float64: the map must not create ties by rounding
    a, b = proxy_metrics(dS, dR), proxy_metrics(dS, scale * dR + shift)
    for m in a:
        assert b[m].mean == pytest.approx(a[m].mean, abs=1e-6), m


def test_table_has_one_row_per_metric_and_the_steps_in_the_range():
    dS, dR = rows(6, T=8)
    table = format_table({"r": proxy_metrics(dS, dR)}, steps=8)
    assert "| argmax_distance | [0, 7] |" in table
    assert len(table.splitlines()) == 2 + 7


# ------------------------------------------------------------------ the driver


def test_trace_uses_the_trainers_own_rollouts(tmp_path):
    """The clean prediction of state T-1 is what the run decodes and scores (final_latent = x0), so its
    reward must equal the trainer's score phase on the same rollout."""
    trainer, where = load_policy_trainer(None, TINY, None, tmp_path)
    assert where == {"source": "defaults", "weights": "base"}
    trace = trace_trajectories(trainer, 5, "x0")
    T = trainer.cfg.sampler.num_steps
    assert trace.gains.shape == (5, T) and trace.scores.shape == (5, T + 1, 3) and len(trace.prompts) == 5
    assert trace.steps == T - 1  # the default run drops the last step
    batch = trainer.sample_prompts(0)
    traj, _ = trainer.rollout(batch, 0)
    torch.testing.assert_close(trace.scores[:, T - 1], trainer.score(traj, batch)[:5], rtol=0, atol=1e-6)
    results = analyze_trace(trace)
    assert list(results) == ["digit-alignment", "stroke-quality", "jpeg-compressibility", ZSUM]
    assert all(isinstance(v, Stat) for v in results[ZSUM].values())


def test_state_view_scores_the_states_themselves(tmp_path):
    trainer, _ = load_policy_trainer(None, [*TINY, "sampler.final_latent=last"], None, tmp_path)
    trace = trace_trajectories(trainer, 6, "state")
    batch = trainer.sample_prompts(0)
    traj, _ = trainer.rollout(batch, 0)
    torch.testing.assert_close(trace.scores[:, -1], trainer.score(traj, batch), rtol=0, atol=1e-6)


def test_a_run_is_analysed_with_its_checkpoint_weights_and_the_cli_writes_the_report(tmp_path, capsys):
    from otca.cli import main
    from otca.config import load_config
    from otca.trainer import Trainer

    run = tmp_path / "run"
    Trainer(load_config(None, [*TINY, "train.iterations=1", "progress=false", f"out_dir={run}"])).train()
    trainer, where = load_policy_trainer(None, [], str(run), tmp_path / "a")
    ckpt = run / "checkpoints" / "iter-000001"
    assert where["weights"] == str(ckpt)
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / "trainable.safetensors"))
    assert all(torch.equal(p.detach(), saved[n]) for n, p in trainer.params.items())

    out = tmp_path / "report"
    assert main(["analyze-credit", "--run", str(run), "--trajectories", "7", "--out", str(out)]) == 0
    assert "| pearson |" in capsys.readouterr().out
    payload = json.loads((out / "analysis.json").read_text())
    assert payload["trajectories"] == 7 and payload["weights"] == str(ckpt) and payload["view"] == "x0"
    assert set(payload["results"]) == {"digit-alignment", "stroke-quality", "jpeg-compressibility", ZSUM}
    assert (out / "analysis.md").is_file() and (out / "analysis.png").is_file()


def test_bad_input_is_a_one_line_error(tmp_path, capsys):
    from otca.cli import main

    assert main(["analyze-credit", "--view", "bogus"]) == 2
    assert capsys.readouterr().err.strip() == "otca: error: unknown decoded view 'bogus': known are state, x0"
    with pytest.raises(ValueError, match="trajectories: expected >= 1"):
        analyze_credit(None, TINY, trajectories=0, out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="not both"):
        load_policy_trainer("x.yaml", [], "run", tmp_path)
