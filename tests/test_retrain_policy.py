"""The incremental night's retrain-or-score rule (ml/retrain_policy.py): a pure function, tested alone."""

from __future__ import annotations

from datetime import date

import pytest

from ml.params import RETRAIN_MODES, RunParams
from ml.retrain_policy import MAX_CUSTOMER_CHANGE, ChampionFacts, decide
from ml.retrain_policy import RETRAIN_MODES as POLICY_MODES

TODAY = date(2026, 11, 26)
FRESH = ChampionFacts(version="3", trained_as_of=date(2026, 11, 23), n_customers=1000)


def _decide(mode="auto", champion=FRESH, *, n_customers=1000, every=7, as_of=TODAY):
    return decide(mode, champion, as_of=as_of, n_customers=n_customers, retrain_every_days=every)


def test_a_fresh_champion_only_scores():
    decision = _decide()
    assert not decision.retrain and decision.action == "scored"
    assert "version 3" in decision.reason


@pytest.mark.parametrize("mode", RETRAIN_MODES)
def test_no_champion_always_trains_even_under_never(mode):
    decision = _decide(mode, ChampionFacts(version=None))
    assert decision.retrain and decision.action == "retrained"
    assert "no champion" in decision.reason


def test_age_beyond_the_limit_retrains_and_at_the_limit_does_not():
    at_limit = ChampionFacts(version="3", trained_as_of=date(2026, 11, 19), n_customers=1000)  # 7 days
    assert not _decide(champion=at_limit, every=7).retrain
    decision = _decide(champion=at_limit, every=6)
    assert decision.retrain and "7 days old" in decision.reason


@pytest.mark.parametrize("n_now, retrain", [(1200, False), (800, False), (1201, True), (799, True), (5000, True)])
def test_customer_count_change_beyond_20_percent_retrains(n_now, retrain):
    assert MAX_CUSTOMER_CHANGE == 0.20
    decision = _decide(n_customers=n_now)
    assert decision.retrain is retrain, decision.reason
    if retrain:
        assert "customers changed" in decision.reason


def test_unknown_training_facts_retrain_under_auto():
    assert _decide(champion=ChampionFacts(version="1", trained_as_of=None, n_customers=1000)).retrain
    assert _decide(champion=ChampionFacts(version="1", trained_as_of=TODAY, n_customers=None)).retrain


def test_always_and_never_override_the_rule():
    stale = ChampionFacts(version="2", trained_as_of=date(2020, 1, 1), n_customers=10)
    assert _decide("always", FRESH).retrain
    decision = _decide("never", stale, n_customers=10**6)
    assert not decision.retrain and "retrain=never" in decision.reason


def test_a_backfill_of_an_earlier_date_than_the_champion_scores_under_auto():
    # A negative age (the champion is newer than the backfilled date) is not staleness.
    assert not _decide(as_of=date(2026, 11, 1)).retrain


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="sometimes"):
        _decide("sometimes")


def test_run_parameters_carry_and_validate_the_policy():
    assert set(RETRAIN_MODES) == set(POLICY_MODES)
    params = RunParams.from_mapping({"retrain": "Never", "retrain_every_days": "3"})
    assert (params.retrain, params.retrain_every_days) == ("never", 3)
    assert (RunParams().retrain, RunParams().retrain_every_days) == ("auto", 7)
    with pytest.raises(Exception, match="retrain_every_days: 0 is outside 1 .. 365"):
        RunParams.from_mapping({"retrain_every_days": 0})
    with pytest.raises(Exception, match="retrain: 'weekly' is not one of auto, always, never"):
        RunParams.from_mapping({"retrain": "weekly"})
