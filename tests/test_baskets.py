"""Frequent itemsets and association rules: reference counts, metrics, pruning, bad input."""

from __future__ import annotations

import gzip
from itertools import combinations

import numpy as np
import pandas as pd
import pytest
from helpers_online_retail import load_online_retail
from mlxtend.frequent_patterns import association_rules as mlx_rules
from mlxtend.frequent_patterns import fpgrowth as mlx_fpgrowth

from ml.baskets import (
    ALGORITHMS,
    AssociationRules,
    BasketError,
    FrequentItemsets,
    NoFrequentItemsets,
    TooManyItemsets,
    basket_item_matrix,
    mine_rules,
)


@pytest.fixture(scope="module")
def fimi(request):
    from helpers_online_retail import SHARED_DATA

    with gzip.open(SHARED_DATA / "fimi_retail.dat.gz", "rt") as fh:
        return [line.split() for line in fh if line.strip()]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_fimi_itemset_counts_equal_the_reference_for_every_algorithm(fimi, algorithm):
    # the reference counts include single items: 159 / 2,691 / 7,589 at 1 % / 0.2 % / 0.1 %
    got = {s: len(FrequentItemsets(algorithm=algorithm, min_support=s).fit(fimi).itemsets_)
           for s in (0.01, 0.002, 0.001)}
    assert got == {0.01: 159, 0.002: 2691, 0.001: 7589}


def test_fimi_supports_are_exact_counts(fimi):
    model = FrequentItemsets(min_support=0.01, max_len=2).fit(fimi)
    sets = model.itemsets_
    assert model.n_baskets_ == 88162
    assert sets["length"].max() == 2
    # recount two itemsets by brute force on the raw baskets
    for itemset in [sets["itemset"].iloc[0], sets.loc[sets["length"] == 2, "itemset"].iloc[0]]:
        count = sum(1 for basket in fimi if set(itemset) <= set(basket))
        assert sets.loc[sets["itemset"] == itemset, "count"].item() == count
    assert (sets["count"] >= model.min_count_).all() and model.min_count_ == 882


def _toy_baskets() -> pd.DataFrame:
    rng = np.random.default_rng(7)
    rows = []
    for b in range(400):
        items = set(rng.choice(list("abcdefgh"), size=rng.integers(1, 5), replace=False))
        if "a" in items and rng.random() < 0.7:
            items.add("b")
        if {"a", "b"} <= items and rng.random() < 0.5:
            items.add("c")
        rows += [{"basket_id": f"o{b}", "product_id": i, "category": "x" if i < "e" else "y"} for i in items]
    return pd.DataFrame(rows)


def test_rule_metrics_equal_mlxtend():
    lines = _toy_baskets()
    itemsets = FrequentItemsets(min_support=0.05).fit(lines)
    ours = AssociationRules(min_confidence=0.0, min_lift=0.0, prune_redundant=False).fit(itemsets).rules_

    onehot = pd.crosstab(lines["basket_id"], lines["product_id"]).astype(bool)
    ref_sets = mlx_fpgrowth(onehot, min_support=0.05, use_colnames=True)
    assert len(ref_sets) == len(itemsets.itemsets_)
    ref = mlx_rules(ref_sets, num_itemsets=len(onehot), metric="confidence", min_threshold=0.0)
    ref = ref[ref["consequents"].apply(len) == 1]
    ref = ref.assign(antecedent=ref["antecedents"].apply(lambda s: tuple(sorted(s))),
                     consequent=ref["consequents"].apply(lambda s: next(iter(s))))
    merged = ours.merge(ref, on=["antecedent", "consequent"], suffixes=("", "_ref"), validate="1:1")
    assert len(merged) == len(ours) == len(ref)
    for col in ("support", "confidence", "lift", "leverage"):
        np.testing.assert_allclose(merged[col], merged[f"{col}_ref"], rtol=1e-9)
    finite = np.isfinite(merged["conviction_ref"])
    np.testing.assert_allclose(merged.loc[finite, "conviction"], merged.loc[finite, "conviction_ref"], rtol=1e-9)


def test_redundant_rules_are_pruned_only_when_a_general_rule_is_as_confident():
    # a -> c has confidence 1; (a, b) -> c also 1: redundant.
    # d -> f and e -> f 0.5, (d, e) -> f 1.0: kept.
    baskets = [["a", "b", "c"]] * 4 + [["a", "c"]] * 2 + [["d", "e", "f"]] * 3 + [["d"]] * 3 + [["e"]] * 3
    itemsets = FrequentItemsets(min_support=0.1).fit(baskets)
    pruned = AssociationRules(min_confidence=0.5).fit(itemsets)
    full = AssociationRules(min_confidence=0.5, prune_redundant=False).fit(itemsets)
    rules = {(r.antecedent, r.consequent) for r in pruned.rules_.itertuples()}
    assert (("a",), "c") in rules and (("a", "b"), "c") not in rules
    assert (("d", "e"), "f") in rules and (("d",), "f") in rules
    assert (("a", "b"), "c") in {(r.antecedent, r.consequent) for r in full.rules_.itertuples()}
    assert pruned.n_redundant_ == len(full.rules_) - len(pruned.rules_) > 0
    # brute force: no kept rule has a kept-or-not general form with >= confidence
    conf = {(r.antecedent, r.consequent): r.confidence for r in full.rules_.itertuples()}
    all_conf = AssociationRules(min_confidence=0.0, min_lift=0.0, prune_redundant=False).fit(itemsets).rules_
    every = {(r.antecedent, r.consequent): r.confidence for r in all_conf.itertuples()}
    for (ante, cons), c in conf.items():
        generals = [every.get((sub, cons), -1) for n in range(1, len(ante)) for sub in combinations(ante, n)]
        redundant = any(g >= c for g in generals)
        assert ((ante, cons) in rules) == (not redundant)


def test_dataframe_and_transactions_give_the_same_itemsets_and_category_level_works():
    lines = _toy_baskets()
    from_frame = FrequentItemsets(min_support=0.05, max_len=2).fit(lines).itemsets_
    tx = lines.groupby("basket_id")["product_id"].agg(list).tolist()
    from_tx = FrequentItemsets(min_support=0.05, max_len=2).fit(tx).itemsets_
    pd.testing.assert_frame_equal(from_frame, from_tx)
    cats = FrequentItemsets(min_support=0.05, level="category").fit(lines)
    assert set(cats.itemsets_["itemset"]) == {("x",), ("y",), ("x", "y")}
    rules = AssociationRules(min_confidence=0.0, min_lift=0.0).fit(cats).rules_
    assert set(rules["level"]) == {"category"}


def test_sparse_basket_matrix():
    m, baskets, items = basket_item_matrix(_toy_baskets())
    assert m.format == "csr" and m.shape == (len(baskets), len(items)) and m.nnz == len(_toy_baskets())


def test_threshold_errors_speak_with_counts_and_hints(fimi):
    with pytest.raises(TooManyItemsets, match=r"gives 7,589 frequent itemsets.*raise min_support to at least 0\.00"):
        FrequentItemsets(min_support=0.001, max_itemsets=3000).fit(fimi)
    # the suggested support indeed fits under the cap
    try:
        FrequentItemsets(min_support=0.001, max_itemsets=3000).fit(fimi)
    except TooManyItemsets as err:
        suggested = float(str(err).split("at least ")[1].split()[0])
    assert len(FrequentItemsets(min_support=suggested).fit(fimi).itemsets_) <= 3000
    with pytest.raises(NoFrequentItemsets, match=r"most frequent item is in 50,675 baskets"):
        FrequentItemsets(min_support=0.9).fit(fimi)


def test_bad_input():
    with pytest.raises(BasketError, match="no baskets"):
        FrequentItemsets().fit(pd.DataFrame({"basket_id": [], "product_id": []}))
    with pytest.raises(BasketError, match="no baskets"):
        FrequentItemsets().fit([[], []])
    with pytest.raises(BasketError, match="algorithm must be one of"):
        FrequentItemsets(algorithm="magic").fit([["a"]])
    with pytest.raises(BasketError, match="min_support"):
        FrequentItemsets(min_support=5).fit([["a"]])
    # one item only: itemsets but, documented, no rules
    one = FrequentItemsets(min_support=0.5).fit([["a"], ["a"], ["a"]])
    assert one.itemsets_["itemset"].tolist() == [("a",)]
    assert AssociationRules().fit(one).rules_.empty


def test_online_retail_rules_read_like_cross_sell():
    lines = load_online_retail(n_invoices=3000)
    rules = mine_rules(lines, min_support=0.02, min_confidence=0.3, min_lift=2.0)
    assert len(rules) > 0
    assert (rules["confidence"] >= 0.3).all() and (rules["lift"] >= 2.0).all()
    assert set(rules.columns) >= {"antecedent", "consequent", "support", "confidence", "lift", "leverage",
                                  "conviction", "level"}
