"""The drift alarm on hand-made evaluation rows."""

import pytest

from otca.monitor import alarm_metrics, drift_alarms

SIGNALS = {"eval/judge_alignment": "up", "eval/fidelity_fd": "down"}


def row(it, reward, judge, fd):
    return {"iteration": it, "reward/a": reward, "reward/b": 0.5, "eval/judge_alignment": judge,
            "eval/fidelity_fd": fd}


def test_alarm_when_the_reward_rises_and_a_signal_falls_beyond_the_tolerance():
    h = [row(0, 0.80, 0.90, 4.0), row(10, 0.85, 0.80, 4.1)]
    alarms = drift_alarms(h, SIGNALS, window=1, tolerance=0.05)
    # judge: (0.90 - 0.80) / 0.90 = 11.1 % > 5 %; fidelity: (4.1 - 4.0) / 4.0 = 2.5 % <= 5 %
    assert len(alarms) == 1
    a = alarms[0]
    assert (a.reward, a.signal, a.since, a.at) == ("reward/a", "eval/judge_alignment", 0, 10)
    assert a.rise == pytest.approx(0.05) and a.fall == pytest.approx(0.1 / 0.9)
    assert "iteration 10" in str(a) and "11.1%" in str(a)
    assert alarm_metrics(alarms, SIGNALS) == {"monitor/alarm": 1.0, "monitor/fall/judge_alignment": a.fall}
    # fidelity (lower is better) rising by 50 % alarms too
    both = drift_alarms([row(0, 0.8, 0.9, 4.0), row(10, 0.9, 0.9, 6.0)], SIGNALS, tolerance=0.05)
    assert [(x.signal, round(x.fall, 6)) for x in both] == [("eval/fidelity_fd", 0.5)]


def test_no_alarm_without_a_rising_reward_or_within_tolerance():
    assert drift_alarms([row(0, 0.8, 0.9, 4.0), row(10, 0.8, 0.5, 9.0)], SIGNALS) == []  # no reward rose
    assert drift_alarms([row(0, 0.8, 0.9, 4.0), row(10, 0.9, 0.88, 4.0)], SIGNALS, tolerance=0.05) == []  # 2.2 %
    assert drift_alarms([row(0, 0.8, 0.9, 4.0)], SIGNALS) == []  # one row
    assert alarm_metrics([], SIGNALS) == {"monitor/alarm": 0.0}


def test_window_compares_with_the_row_that_many_evaluations_back():
    h = [row(0, 0.70, 0.90, 4.0), row(10, 0.75, 0.86, 4.0), row(20, 0.80, 0.84, 4.0)]
    assert drift_alarms(h, SIGNALS, window=1, tolerance=0.05) == []  # 0.86 -> 0.84: 2.3 %
    (a,) = drift_alarms(h, SIGNALS, window=2, tolerance=0.05)  # 0.90 -> 0.84: 6.7 %
    assert a.since == 0 and a.fall == pytest.approx(0.06 / 0.9) and a.rise == pytest.approx(0.10)
    (b,) = drift_alarms(h, SIGNALS, window=5, tolerance=0.05)  # fewer rows: against the first
    assert b.since == 0


def test_missing_signals_are_skipped_and_bad_options_named():
    h = [{"iteration": 0, "reward/a": 0.1}, {"iteration": 5, "reward/a": 0.2}]
    assert drift_alarms(h, SIGNALS) == []
    with pytest.raises(ValueError, match="monitor signal 'eval/x': expected direction 'up' or 'down'"):
        drift_alarms(h, {"eval/x": "sideways"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="window >= 1"):
        drift_alarms(h, SIGNALS, window=0)
