"""Retrain or only score, per model family, on an incremental night: one pure decision, no I/O.

Retraining all three families every night costs most of the incremental night (bench/RESULTS.md) while the
data moved by one day. A champion is kept and only re-scores the rebuilt marts unless one of these holds:

* there is no champion yet (nothing to score with);
* the champion was trained on an ``as_of`` more than ``retrain_every_days`` before today's (it has aged);
* the number of customers moved by more than :data:`MAX_CUSTOMER_CHANGE` since the champion's training run
  (the population shifted: new markets, a big acquisition campaign, a purge);
* the champion's training ``as_of`` or customer count is unknown (e.g. trained by hand, outside the
  nightly run): it cannot be shown to be fresh, so it is retrained.

``retrain="always"`` and ``"never"`` override the rule; ``"never"`` still has to train when there is no
champion, because there is nothing else to score with.

The caller (``ml.nightly``) reads the champion's facts from MLflow and acts on the decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

RETRAIN_MODES = ("auto", "always", "never")
# Relative change of the customer count that makes a champion stale, in either direction.
MAX_CUSTOMER_CHANGE = 0.20


@dataclass(frozen=True)
class ChampionFacts:
    """What the decision needs to know about a family's current champion (``None`` fields: unknown)."""

    version: str | None  # registered model version holding @champion; None when there is no champion
    trained_as_of: date | None = None  # the ``as_of`` tag of the run that trained it
    n_customers: int | None = None  # customers in the marts of that training run


@dataclass(frozen=True)
class Decision:
    retrain: bool
    reason: str

    @property
    def action(self) -> str:
        """``retrained`` or ``scored``: the word the run summary records."""
        return "retrained" if self.retrain else "scored"


def decide(mode: str, champion: ChampionFacts, *, as_of: date, n_customers: int,
           retrain_every_days: int) -> Decision:
    """Retrain or score one family tonight (see the module docstring for the rule)."""
    if mode not in RETRAIN_MODES:
        raise ValueError(f"retrain mode {mode!r} is not one of {', '.join(RETRAIN_MODES)}")
    if champion.version is None:
        return Decision(True, "no champion yet: nothing to score with")
    if mode == "always":
        return Decision(True, "retrain=always")
    if mode == "never":
        return Decision(False, f"retrain=never: champion version {champion.version} kept")
    if champion.trained_as_of is None:
        return Decision(True, f"champion version {champion.version} has no training as_of tag")
    age = (as_of - champion.trained_as_of).days
    if age > retrain_every_days:
        return Decision(True, f"champion trained as of {champion.trained_as_of} is {age} days old "
                              f"(> retrain_every_days {retrain_every_days})")
    if champion.n_customers is None or champion.n_customers <= 0:
        return Decision(True, f"champion version {champion.version} has no recorded customer count")
    change = (n_customers - champion.n_customers) / champion.n_customers
    if abs(change) > MAX_CUSTOMER_CHANGE:
        return Decision(True, f"customers changed by {change:+.0%} since the champion's training "
                              f"({champion.n_customers} -> {n_customers}; limit ±{MAX_CUSTOMER_CHANGE:.0%})")
    return Decision(False, f"champion version {champion.version} trained as of {champion.trained_as_of} "
                           f"({age} days old, customers {change:+.0%}): still fresh")
