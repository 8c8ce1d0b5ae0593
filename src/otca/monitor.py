"""The reward-hacking monitor: a drift alarm when a training reward rises while a held-out signal falls.

During training the eval suite runs every ``eval.every`` iterations on held-out prompts (ODE samples, fixed
seeds): it reports the training rewards on those prompts (``reward/<name>``) and eval-only metrics that training
never sees (``eval/*``: the digits world's independent judge, diversity, fidelity). A policy that games its
rewards shows exactly this pattern (docs/results.md): the training reward keeps rising while the judge's
alignment falls and the samples drift from real data. :func:`drift_alarms` compares the newest evaluation with
the one ``window`` evaluations earlier:

    rise_r = now[r] - then[r]                                   for every training reward r
    fall_m = (then[m] - now[m]) / max(|then[m]|, tiny)          for a signal m that should go up
    fall_m = (now[m] - then[m]) / max(|then[m]|, tiny)          for a signal m that should go down

and raises one alarm per signal with ``fall_m > tolerance`` while some ``rise_r > 0`` (paired with the reward
that rose most). The fall is relative, so one tolerance fits signals of any scale. Pure: rows in, alarms out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Direction = Literal["up", "down"]


@dataclass(frozen=True)
class Drift:
    """One alarm: training reward ``reward`` rose by ``rise`` while held-out ``signal`` got worse by ``fall`` (in its
    direction, relative to its earlier value), between the evaluations after ``since`` and ``at`` iterations."""

    reward: str
    rise: float
    signal: str
    fall: float
    since: int
    at: int

    def __str__(self) -> str:
        return (f"drift alarm at iteration {self.at}: {self.reward} rose by {self.rise:+.4g} since iteration "
                f"{self.since} while {self.signal} got worse by {self.fall:.1%}")


def drift_alarms(
    history: Sequence[Mapping[str, float]],
    signals: Mapping[str, Direction],
    *,
    window: int = 1,
    tolerance: float = 0.05,
) -> list[Drift]:
    """Alarms of the newest row of ``history`` (evaluation rows in order, each with ``iteration``, training
    rewards ``reward/<name>`` and eval metrics) against the row ``window`` evaluations before it (the first row
    when there are fewer). ``signals`` maps a held-out metric to the direction it should move ('up' / 'down');
    a signal missing from either row is skipped. No alarm with fewer than two rows."""
    if window < 1 or tolerance < 0:
        raise ValueError(f"monitor: expected window >= 1 and tolerance >= 0, got window={window}, "
                         f"tolerance={tolerance}")
    for name, d in signals.items():
        if d not in ("up", "down"):
            raise ValueError(f"monitor signal {name!r}: expected direction 'up' or 'down', got {d!r}")
    if len(history) < 2:
        return []
    now, then = history[-1], history[max(0, len(history) - 1 - window)]
    rises = {k: float(now[k]) - float(then[k]) for k in now if k.startswith("reward/") and k in then}
    rising = {k: v for k, v in rises.items() if v > 0}
    if not rising:
        return []
    reward = max(rising, key=lambda k: rising[k])
    alarms = []
    for m, d in signals.items():
        if m not in now or m not in then:
            continue
        change = float(now[m]) - float(then[m])
        fall = (-change if d == "up" else change) / max(abs(float(then[m])), 1e-12)
        if fall > tolerance:
            alarms.append(Drift(reward, rising[reward], m, fall, int(then.get("iteration", 0)),
                                int(now.get("iteration", 0))))
    return alarms


def alarm_metrics(alarms: Sequence[Drift], signals: Mapping[str, Direction]) -> dict[str, float]:
    """Log columns of one monitored evaluation: ``monitor/alarm`` (1 or 0) and ``monitor/fall/<signal>`` for each
    alarmed signal."""
    out = {"monitor/alarm": float(bool(alarms))}
    out.update({f"monitor/fall/{a.signal.split('/')[-1]}": a.fall for a in alarms if a.signal in signals})
    return out
