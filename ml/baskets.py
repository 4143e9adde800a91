"""Frequent itemsets and association rules over market baskets.

The maths only: pure functions and scikit-learn-style estimators over DataFrames and sparse
structures. Reading ``marts.basket_lines`` and publishing rules live at the edges (ml/publish.py).

Mining is delegated to Borgelt's compiled miners (PyPI ``pyfim``: FP-Growth, Apriori, Eclat). We
feed them one short list per basket (integer codes for basket lines; the caller's own lists for raw
transactions, which the miner hashes in C, so no second copy is made), never a dense baskets x items
matrix, and before materialising any itemset we ask the miner for the *pattern spectrum* (how many
itemsets of each size and support exist — counts only, constant memory), so a threshold that would
produce millions of itemsets fails with the count and a workable threshold instead of exhausting RAM.
That guard is a second pass of the miner: it is most of the difference from a bare pyfim call.

The import path is kept lean (numpy and pandas; no scikit-learn, scipy only for the sparse matrix
helper): the FIMI benchmark process otherwise holds ~290 MB before mining starts.

Support thresholds are fractions of baskets and inclusive: an itemset is frequent when it occurs in
at least ``ceil(min_support * n_baskets)`` baskets (the same convention as mlxtend, and the one under
which the FIMI "retail" reference counts 159 / 2,691 / 7,589 at 1 % / 0.2 % / 0.1 % hold — singletons
included).
"""

from __future__ import annotations

import collections
import contextlib
import gc
import inspect
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ml.errors import CrmError

if TYPE_CHECKING:  # scipy only for the sparse matrix helper: importing it costs ~40 MB the miner never uses
    import scipy.sparse as sp

ALGORITHMS = ("fpgrowth", "apriori", "eclat")
LEVELS = ("product", "category")
RULE_COLUMNS = [
    "antecedent",
    "consequent",
    "antecedent_str",
    "antecedent_len",
    "antecedent_support",
    "consequent_support",
    "support",
    "confidence",
    "lift",
    "leverage",
    "conviction",
    "n_baskets_with_rule",
    "level",
]


class BasketError(CrmError):
    """Baskets or thresholds that cannot give a useful result (no baskets, nothing frequent, too much)."""


class NoFrequentItemsets(BasketError):
    """The support threshold leaves no frequent itemset."""


class TooManyItemsets(BasketError):
    """The support threshold would produce more itemsets than the configured cap."""


class _Params:
    """``get_params`` / ``set_params`` / repr like scikit-learn's ``BaseEstimator`` (so ``sklearn.clone``
    works), without importing scikit-learn and scipy: they are ~80 MB of the miner's process otherwise
    (bench bound 7). Parameters are the ``__init__`` arguments, stored under the same names."""

    @classmethod
    def _param_names(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> _Params:
        unknown = set(params) - set(self._param_names())
        if unknown:
            raise ValueError(f"invalid parameter(s) {sorted(unknown)} for {type(self).__name__}")
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = {n: p.default for n, p in inspect.signature(type(self).__init__).parameters.items()}
        changed = [f"{k}={v!r}" for k, v in self.get_params().items() if defaults.get(k) != v]
        return f"{type(self).__name__}({', '.join(changed)})"


# --------------------------------------------------------------------------------------------------
# baskets: long lines -> integer-coded transactions / sparse basket x item matrix


def _basket_column(lines: pd.DataFrame) -> str:
    for name in ("basket_id", "order_id"):
        if name in lines.columns:
            return name
    raise BasketError(
        f"basket lines need a 'basket_id' (or 'order_id') column; got columns {list(lines.columns)}"
    )


def item_column(level: str) -> str:
    if level not in LEVELS:
        raise BasketError(f"level must be one of {LEVELS}, got {level!r}")
    return "product_id" if level == "product" else "category"


def encode_baskets(lines: pd.DataFrame, level: str = "product") -> tuple[pd.Index, pd.Index, np.ndarray, np.ndarray]:
    """Distinct (basket, item) pairs as integer codes.

    Returns ``(baskets, items, basket_codes, item_codes)`` where the code arrays are sorted by basket,
    ``baskets[basket_codes[k]]`` / ``items[item_codes[k]]`` name pair ``k``. Lines without an item
    (e.g. a product without a category at category level) are dropped: they cannot be in an itemset.
    """
    basket_col, col = _basket_column(lines), item_column(level)
    if col not in lines.columns:
        raise BasketError(f"level={level!r} needs a {col!r} column in the basket lines")
    pairs = lines[[basket_col, col]].dropna().drop_duplicates()
    if pairs.empty:
        raise BasketError(
            "no baskets to mine: the basket lines are empty (after dropping lines without "
            f"{col!r}); check the as_of date and that marts.basket_lines was built"
        )
    basket_codes, baskets = pd.factorize(pairs[basket_col], sort=True)
    item_codes, items = pd.factorize(pairs[col].astype(str), sort=True)
    order = np.argsort(basket_codes, kind="stable")
    return pd.Index(baskets), pd.Index(items), basket_codes[order], item_codes[order]


def basket_item_matrix(lines: pd.DataFrame, level: str = "product") -> tuple[sp.csr_matrix, pd.Index, pd.Index]:
    """Boolean sparse baskets x items matrix (CSR) with its row and column labels."""
    import scipy.sparse as sp

    baskets, items, b, i = encode_baskets(lines, level)
    m = sp.csr_matrix((np.ones(len(b), dtype=np.float32), (b, i)), shape=(len(baskets), len(items)))
    return m, baskets, items


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while building ~100k lists (or millions of result tuples):
    none of them can form a cycle, yet every 700 allocations would trigger a collection that walks
    them all again (0.2 s of 0.25 s for the FIMI file's transactions)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _transactions_from_codes(basket_codes: np.ndarray, item_codes: np.ndarray) -> list[list[int]]:
    # one tolist() and plain list slices: far cheaper than 100k small numpy arrays (which pyfim
    # cannot read anyway: it crashes on numpy arrays as transactions)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(basket_codes)) + 1, [len(item_codes)]]).tolist()
    flat = item_codes.tolist()
    with _no_gc():
        return [flat[a:b] for a, b in itertools.pairwise(bounds)]


def _encode_transactions(transactions: Iterable[Sequence]) -> tuple[pd.Index, np.ndarray, np.ndarray]:
    """Integer-code raw transactions (e.g. the FIMI file: one list of item labels per basket).

    One flat object array through pandas' C hash table (no per-item Python work), then duplicates
    inside a basket dropped with a single ``np.unique`` over (basket, item) keys.
    """
    transactions = [t for t in transactions if len(t)]
    if not transactions:
        raise BasketError("no baskets to mine: every transaction is empty")
    lengths = np.fromiter((len(t) for t in transactions), dtype=np.int64, count=len(transactions))
    flat = np.fromiter(itertools.chain.from_iterable(transactions), dtype=object, count=int(lengths.sum()))
    codes, items = pd.factorize(flat.astype(str), sort=True)
    basket = np.repeat(np.arange(len(transactions), dtype=np.int64), lengths)
    keys = np.sort(basket * len(items) + codes)
    keys = keys[np.concatenate([[True], np.diff(keys) != 0])]
    return pd.Index(items.astype(str)), keys // len(items), keys % len(items)


# --------------------------------------------------------------------------------------------------
# frequent itemsets


def _miner(algorithm: str):
    if algorithm not in ALGORITHMS:
        raise BasketError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    import fim  # Borgelt's C miners; imported here so the module loads without them

    return getattr(fim, algorithm)


def min_count(min_support: float, n_baskets: int) -> int:
    """Inclusive absolute threshold for a fractional support (at least one basket)."""
    if not 0 < min_support <= 1:
        raise BasketError(f"min_support is a fraction of baskets in (0, 1], got {min_support!r}")
    # round first: 0.01 * 88162 is 881.62000000000001 in floating point, the intended count 882
    return max(1, math.ceil(round(min_support * n_baskets, 9)))


class FrequentItemsets(_Params):
    """Frequent itemsets of baskets (FP-Growth by default; Apriori and Eclat give identical sets).

    ``fit`` takes basket lines (a DataFrame with ``basket_id``/``order_id`` and ``product_id`` — or
    ``category`` at ``level='category'``) or an iterable of transactions (lists of item labels; items
    are compared as given and reported as text, so give one type of label per item).

    Learned: ``itemsets_`` DataFrame[itemset (tuple of item labels, sorted), length, count, support],
    sorted by length, then count (descending), then the itemset; ``n_baskets_``; ``items_`` (the labels
    of the frequent items, sorted); ``item_counts_`` (baskets per frequent item, aligned to ``items_``);
    ``codes_`` (itemsets as tuples of integer codes into ``items_``; used by the rules).
    """

    def __init__(
        self,
        algorithm: str = "fpgrowth",
        min_support: float = 0.01,
        max_len: int | None = None,
        level: str = "product",
        max_itemsets: int = 2_000_000,
    ):
        self.algorithm = algorithm
        self.min_support = min_support
        self.max_len = max_len
        self.level = level
        self.max_itemsets = max_itemsets

    def fit(self, baskets, y=None) -> FrequentItemsets:
        mine = _miner(self.algorithm)
        if self.max_len is not None and self.max_len < 1:
            raise BasketError(f"max_len must be at least 1 (or None for no limit), got {self.max_len}")
        if isinstance(baskets, pd.DataFrame):
            _, items, b, i = encode_baskets(baskets, self.level)
            tx, labels = _transactions_from_codes(b, i), items.to_numpy()
        else:
            # The caller's transactions go to the C miner as they are: no encoding pass and no second
            # copy of them (the FIMI file is ~70 MB of Python lists already). The miner hashes items
            # itself and drops duplicates inside a basket.
            tx = baskets if isinstance(baskets, list) else list(baskets)
            labels = None
        n = len(tx) - list(map(len, tx)).count(0)  # empty baskets are not baskets
        if n == 0:
            raise BasketError("no baskets to mine: every transaction is empty")
        found, count = self._mine(mine, tx, n)
        built = _itemset_frame(found, labels, n)
        if built is None:
            # Non-text items (e.g. integers) are reported as text, so 1 and "1" must be one item: encode
            # them first (exact, slower; the usual inputs are text).
            items, b, i = _encode_transactions(tx)
            tx, labels = _transactions_from_codes(b, i), items.to_numpy()
            found, count = self._mine(mine, tx, n)
            built = _itemset_frame(found, labels, n)
        frame, codes, items, item_counts = built
        self.itemsets_ = frame
        self.codes_ = codes
        self.n_baskets_ = n
        self.min_count_ = count
        self.items_ = items
        self.item_counts_ = item_counts
        return self

    def _mine(self, mine, tx: list, n: int) -> tuple[list, int]:
        """pyfim's ``(itemset, count)`` pairs at the threshold, after the pattern-spectrum guard."""
        count = min_count(self.min_support, n)
        zmax = self.max_len if self.max_len is not None else -1
        # pyfim reports nothing when an item is in *every* transaction (e.g. one-item data); one empty
        # transaction avoids that and changes no absolute count (supports divide by the real n)
        tx = [*tx, []]
        with _no_gc():
            # pattern spectrum first: counts only, so an explosive threshold cannot exhaust memory
            spectrum = mine(tx, target="s", supp=-count, zmin=1, zmax=zmax, report="#")
            if not spectrum:
                best = _most_frequent_item_count(tx)
                raise NoFrequentItemsets(
                    f"no frequent itemsets at min_support={self.min_support} ({count} of {n:,} baskets): "
                    f"the most frequent item is in {best:,} baskets ({best / n:.4%}); "
                    f"lower min_support to at most {best / n:.6f}"
                )
            total = int(sum(spectrum.values()))
            if total > self.max_itemsets:
                raise TooManyItemsets(
                    f"min_support={self.min_support} ({count} of {n:,} baskets) gives {total:,} frequent "
                    f"itemsets, more than max_itemsets={self.max_itemsets:,}; raise min_support to at least "
                    f"{_support_for_cap(spectrum, self.max_itemsets, n):.6f} or set max_len "
                    "(or raise max_itemsets if you have the memory)"
                )
            return mine(tx, target="s", supp=-count, zmin=1, zmax=zmax, report="a"), count


def _most_frequent_item_count(tx: list) -> int:
    """Baskets of the most frequent item (only for the error message when nothing is frequent)."""
    counts = collections.Counter(itertools.chain.from_iterable(map(set, tx)))
    return max(counts.values(), default=0)


def _itemset_frame(found: list, labels: np.ndarray | None, n: int):
    """pyfim's ``(itemset, count)`` pairs -> (itemsets_ frame, codes_, items_, item_counts_).

    Works on one flat array of the reported items (output-sized, vectorised): items are re-coded
    0..k-1 in label order over the *frequent* items only, each itemset's codes sorted in a padded
    (itemsets x longest) matrix, and the rows put in a total order (length, -count, items) so that
    ties come out the same whatever order the miner reported them in. ``labels`` maps the miner's
    items (integer codes) to labels; without it the items are the labels and must be text: returns
    None when they are not, for the caller to encode them.
    """
    lengths = np.fromiter((len(s) for s, _ in found), dtype=np.int64, count=len(found))
    counts = np.fromiter((c for _, c in found), dtype=np.int64, count=len(found))
    flat = np.fromiter(itertools.chain.from_iterable(s for s, _ in found), dtype=object, count=int(lengths.sum()))
    if labels is not None:  # the miner saw integer codes into labels
        flat = labels[flat.astype(np.int64)]
    codes, items = pd.factorize(flat, sort=True)
    if labels is None and not all(isinstance(item, str) for item in items):  # distinct items: output-sized
        return None
    width = int(lengths.max())
    sentinel = np.iinfo(np.int64).max  # sorts after every code, so each row's codes lead it
    pad = np.full((len(found), width), sentinel, dtype=np.int64)
    rows = np.repeat(np.arange(len(found)), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    pad[rows, np.arange(len(codes)) - np.repeat(starts, lengths)] = codes
    pad.sort(axis=1)
    order = np.lexsort([*(pad[:, j] for j in range(width - 1, -1, -1)), -counts, lengths])
    pad, lengths, counts = pad[order], lengths[order], counts[order]
    names = np.asarray(items, dtype=object)
    label_pad = names[np.where(pad == sentinel, 0, pad)]
    with _no_gc():
        code_rows, label_rows, sizes = pad.tolist(), label_pad.tolist(), lengths.tolist()
        codes_ = [tuple(r[:k]) for r, k in zip(code_rows, sizes, strict=True)]
        itemsets = [tuple(r[:k]) for r, k in zip(label_rows, sizes, strict=True)]
    frame = pd.DataFrame({"itemset": itemsets, "length": lengths, "count": counts, "support": counts / n})
    singles = lengths == 1
    item_counts = np.zeros(len(names), dtype=np.int64)
    item_counts[pad[singles, 0]] = counts[singles]
    return frame, codes_, pd.Index(names), item_counts


def _support_for_cap(spectrum: dict, cap: int, n_baskets: int) -> float:
    """Smallest support fraction whose itemset count stays within ``cap`` (from the pattern spectrum)."""
    by_support = pd.Series(spectrum).groupby(level=1).sum().sort_index(ascending=False)
    within = by_support.cumsum() <= cap
    smallest_ok = by_support.index[within].min() if within.any() else by_support.index.max() + 1
    return float(smallest_ok) / n_baskets


# --------------------------------------------------------------------------------------------------
# association rules


class AssociationRules(_Params):
    """Single-consequent rules ``antecedent -> consequent`` from fitted :class:`FrequentItemsets`.

    Metrics per rule: support (of antecedent + consequent), confidence, lift, leverage, conviction
    (``inf`` when confidence is 1). Thresholds ``min_confidence`` and ``min_lift``. With
    ``prune_redundant`` a rule is dropped when a more general rule — same consequent, antecedent a
    proper non-empty subset — has the same or higher confidence (it adds nothing a marketer can use).

    Learned: ``rules_`` DataFrame with :data:`RULE_COLUMNS` (antecedent as a tuple of labels and as
    a readable string), sorted by lift then confidence; ``n_candidates_``, ``n_redundant_``.
    Itemsets with one item only give an empty ``rules_`` (documented, not an error).
    """

    def __init__(self, min_confidence: float = 0.1, min_lift: float = 1.0, prune_redundant: bool = True,
                 max_antecedent_len: int | None = None):
        self.min_confidence = min_confidence
        self.min_lift = min_lift
        self.prune_redundant = prune_redundant
        self.max_antecedent_len = max_antecedent_len

    def fit(self, itemsets: FrequentItemsets, y=None) -> AssociationRules:
        if not hasattr(itemsets, "itemsets_"):
            raise BasketError("AssociationRules.fit needs a fitted FrequentItemsets (call .fit(baskets) first)")
        if not 0 <= self.min_confidence <= 1:
            raise BasketError(f"min_confidence is a fraction in [0, 1], got {self.min_confidence!r}")
        cand = _candidate_rules(itemsets.codes_, itemsets.itemsets_["count"].to_numpy(), itemsets.n_baskets_)
        if self.max_antecedent_len is not None:
            cand = cand[cand["antecedent_len"] <= self.max_antecedent_len]
        self.n_candidates_ = len(cand)
        if self.prune_redundant and len(cand):
            redundant = cand["confidence"].to_numpy() <= cand["best_general_confidence"].to_numpy()
        else:
            redundant = np.zeros(len(cand), dtype=bool)
        keep = (cand["confidence"] >= self.min_confidence) & (cand["lift"] >= self.min_lift)
        self.n_redundant_ = int((keep & redundant).sum())
        rules = cand[keep & ~redundant]
        labels = itemsets.items_.to_numpy()
        antecedents = [tuple(labels[list(a)]) for a in rules["antecedent_codes"]]
        out = pd.DataFrame(
            {
                "antecedent": antecedents,
                "consequent": labels[rules["consequent_code"].to_numpy()] if len(rules) else np.array([], dtype=object),
                "antecedent_str": [" + ".join(a) for a in antecedents],
            }
        )
        for col in RULE_COLUMNS[3:-1]:
            out[col] = rules[col].to_numpy()
        out["level"] = itemsets.level
        self.rules_ = out.sort_values(["lift", "confidence"], ascending=False, kind="stable").reset_index(drop=True)
        return self


def _candidate_rules(codes: list[tuple[int, ...]], counts: np.ndarray, n_baskets: int) -> pd.DataFrame:
    """Every single-consequent rule of every itemset with >= 2 items, with its metrics.

    Vectorised over a padded (itemsets x max_len) code array: the antecedent of "drop position j" is
    the row with column j removed, looked up by a multi-column merge — no per-rule Python work.
    ``best_general_confidence`` is the highest confidence of any rule with the same consequent and
    a proper non-empty subset of the antecedent (NaN when the antecedent has one item), built level
    by level: best(X -> y) = max over a in X of max(conf(X-a -> y), best(X-a -> y)).
    """
    empty = pd.DataFrame(columns=["antecedent_codes", "consequent_code", *RULE_COLUMNS[3:-1], "best_general_confidence"])
    lengths = np.fromiter((len(c) for c in codes), dtype=np.int64, count=len(codes))
    if len(codes) == 0 or lengths.max() < 2:
        return empty
    width = int(lengths.max())
    pad = np.full((len(codes), width), -1, dtype=np.int64)
    for L in np.unique(lengths):  # one vectorised fill per length, not per itemset
        rows = np.flatnonzero(lengths == L)
        pad[rows, :L] = np.array([codes[r] for r in rows], dtype=np.int64)
    cols = [f"c{j}" for j in range(width)]
    table = pd.DataFrame(pad, columns=cols)
    table["count"] = counts
    singles = table[lengths == 1].set_index("c0")["count"]

    parts = []
    for j in range(width):
        rows = np.flatnonzero(lengths > max(j, 1))  # length >= 2 and position j exists
        if len(rows) == 0:
            continue
        ante = np.delete(pad[rows], j, axis=1)
        ante = np.concatenate([ante, np.full((len(rows), 1), -1, dtype=np.int64)], axis=1)
        part = pd.DataFrame(ante, columns=cols)
        part["consequent_code"] = pad[rows, j]
        part["count"] = counts[rows]
        part["antecedent_len"] = lengths[rows] - 1
        parts.append(part)
    rules = pd.concat(parts, ignore_index=True)
    rules = rules.merge(table.rename(columns={"count": "antecedent_count"}), on=cols, how="left", validate="m:1")
    n = float(n_baskets)
    s_xy = rules["count"].to_numpy() / n
    s_x = rules["antecedent_count"].to_numpy() / n
    s_y = singles.reindex(rules["consequent_code"]).to_numpy() / n
    conf = s_xy / s_x
    with np.errstate(divide="ignore"):
        conviction = np.where(conf >= 1.0, np.inf, (1.0 - s_y) / (1.0 - conf))
    rules["antecedent_support"] = s_x
    rules["consequent_support"] = s_y
    rules["support"] = s_xy
    rules["confidence"] = conf
    rules["lift"] = conf / s_y
    rules["leverage"] = s_xy - s_x * s_y
    rules["conviction"] = conviction
    rules["n_baskets_with_rule"] = rules["count"]
    rules["best_general_confidence"] = _best_general_confidence(rules, cols)
    ante_codes = rules[cols].to_numpy()
    rules["antecedent_codes"] = [tuple(r[r >= 0]) for r in ante_codes]
    return rules[["antecedent_codes", "consequent_code", *RULE_COLUMNS[3:-1], "best_general_confidence"]]


def _best_general_confidence(rules: pd.DataFrame, cols: list[str]) -> np.ndarray:
    best = np.full(len(rules), np.nan)
    key = [*cols, "consequent_code"]
    max_len = int(rules["antecedent_len"].max())
    for L in range(2, max_len + 1):
        idx = np.flatnonzero(rules["antecedent_len"].to_numpy() == L)
        if len(idx) == 0:
            continue
        ante = rules.iloc[idx][cols].to_numpy()
        lower = rules["antecedent_len"].to_numpy() == L - 1
        general = rules.loc[lower, key].copy()
        general["value"] = np.fmax(rules.loc[lower, "confidence"].to_numpy(), best[lower])
        acc = np.full(len(idx), -np.inf)
        for j in range(L):  # drop antecedent position j -> one immediate generalisation
            sub = np.concatenate([np.delete(ante, j, axis=1), np.full((len(idx), 1), -1, dtype=np.int64)], axis=1)
            probe = pd.DataFrame(sub, columns=cols)
            probe["consequent_code"] = rules["consequent_code"].to_numpy()[idx]
            got = probe.merge(general, on=key, how="left", validate="m:1")["value"].to_numpy()
            acc = np.fmax(acc, got)
        best[idx] = acc
    return best


# --------------------------------------------------------------------------------------------------
# convenience


def mine_rules(
    lines: pd.DataFrame,
    *,
    level: str = "product",
    algorithm: str = "fpgrowth",
    min_support: float = 0.01,
    max_len: int | None = 3,
    min_confidence: float = 0.1,
    min_lift: float = 1.0,
    prune_redundant: bool = True,
    max_itemsets: int = 2_000_000,
) -> pd.DataFrame:
    """Itemsets then rules in one call; returns the rules DataFrame (see :class:`AssociationRules`)."""
    itemsets = FrequentItemsets(
        algorithm=algorithm, min_support=min_support, max_len=max_len, level=level, max_itemsets=max_itemsets
    ).fit(lines)
    return AssociationRules(
        min_confidence=min_confidence, min_lift=min_lift, prune_redundant=prune_redundant
    ).fit(itemsets).rules_
