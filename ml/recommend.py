"""Recommenders for cross-sell: popularity, rules, item- and user-based CF, content-based, hybrid.

All share one interface (scikit-learn style, learned state ends in ``_``)::

    rec = ItemKNNRecommender(weighting="bm25").fit(interactions, products=None)
    rec.recommend(customer_ids, n=10, exclude_purchased=True)
        -> DataFrame[customer_id, rank, product_id, score, method, reason]
    rec.recommend_for_basket(basket_items, customer_id=None, n=10)   # request time

``interactions`` is ``basket_lines``/``fct_order_lines``-shaped: ``customer_id``, ``product_id``,
``basket_id`` (or ``order_id``) and, for recency, ``ordered_at``. ``products`` is
``dim_products``-shaped (``product_id``, ``product_name``, ``category``, ``subcategory``, ``brand``,
``price_band``) and is needed only by the content-based model (and for readable reasons).

Everything is sparse (customer x item CSR, item x item top-k CSR); dense arrays exist only for a
chunk of customers x items while scoring, sized so a chunk stays around 4M cells (32 MB as float64):
scoring every customer is a loop over chunks whose memory does not grow with the number of customers.

Every recommendation carries a ``reason`` a marketer can read: the rule that fired, the bought items
it is similar to, or "popular item (no history)" for a customer we have never seen. Slots a model
cannot fill with a positive score (too little history) are filled from popularity, said so in the
reason and with ``method='popularity'``.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import scipy.sparse as sp
from pandas.api.types import union_categoricals
from sklearn.base import BaseEstimator, clone

from ml.baskets import AssociationRules, BasketError, FrequentItemsets
from ml.errors import CrmError

OUTPUT_COLUMNS = ["customer_id", "rank", "product_id", "score", "method", "reason"]
_CHUNK_CELLS = 4_000_000
# an item x item matrix is used dense while scoring when it has at most this many cells (128 MB as float64):
# a sparse x dense product and a dense lookup are several times cheaper than sparse x sparse + todense per chunk.
# float64, as the sparse path: float32 reorders near-tied candidates, which moves the learned blend weights
_DENSE_ITEM_CELLS = 16_000_000
_PREPARED = "crm_prepared_interactions"
# scoring chunks are independent: up to this many are scored at once in threads (NumPy and SciPy's sparse
# products release the GIL); CRM_SCORING_THREADS overrides it (1: serial)
_MAX_SCORING_THREADS = 2
# the per-chunk memo (neighbours, fired rules, blend parts) of each model, per thread: the fitted models are
# shared by the scoring threads, so the memo cannot live on them
_CALL_STATE = threading.local()
_DENSE_LOCK = threading.Lock()
# while a hybrid fits: the base state (indexes, history, recent baskets) of each set of lines, computed once
# and shared by its components (at 1M customers six equal copies cost ~6x the CPU and ~1 GB at the peak)
_FIT_STATE = threading.local()


class RecommenderError(CrmError):
    """Input a recommender cannot work with (no interactions, missing columns, not fitted)."""


# --------------------------------------------------------------------------------------------------
# input shaping


def prepare_interactions(interactions: pd.DataFrame) -> pd.DataFrame:
    """Normalise order lines to ``customer_id, basket_id, product_id, ordered_at`` (distinct rows).

    Lines without a customer cannot be personalised and are dropped. ``ordered_at`` defaults to the
    basket order when absent, so recency still follows the basket sequence.
    """
    if interactions is None or len(interactions) == 0:
        raise RecommenderError("no interactions to learn from: the order lines are empty")
    if interactions.attrs.get(_PREPARED):
        return interactions  # already normalised (a hybrid prepares once for all its components)
    cols = set(interactions.columns)
    basket = "basket_id" if "basket_id" in cols else "order_id" if "order_id" in cols else None
    missing = {"customer_id", "product_id"} - cols
    if missing or basket is None:
        raise RecommenderError(
            f"interactions need customer_id, product_id and basket_id (or order_id); missing "
            f"{sorted(missing | ({'basket_id'} if basket is None else set()))}"
        )
    keep = ["customer_id", basket, "product_id"] + (["ordered_at"] if "ordered_at" in cols else [])
    frame = interactions[keep].rename(columns={basket: "basket_id"}).dropna(subset=["customer_id", "product_id"])
    if frame.empty:
        raise RecommenderError("no interactions with a customer: every order line lacks customer_id")
    frame = frame.astype({"customer_id": "str", "product_id": "str", "basket_id": "str"})
    if "ordered_at" not in frame.columns:
        frame["ordered_at"] = pd.factorize(frame["basket_id"])[0]
    frame = frame.drop_duplicates(["customer_id", "basket_id", "product_id"]).reset_index(drop=True)
    frame.attrs[_PREPARED] = True
    return frame


def products_from_interactions(interactions: pd.DataFrame) -> pd.DataFrame | None:
    """A ``products`` frame from attribute columns carried on the order lines, if any."""
    attrs = [c for c in ("product_name", "description", "category", "subcategory", "brand", "price_band")
             if c in interactions.columns]
    if not attrs:
        return None
    products = interactions[["product_id", *attrs]].dropna(subset=["product_id"]).drop_duplicates("product_id")
    return products.astype({"product_id": "str"}).reset_index(drop=True)


def _l2_rows(m: sp.csr_matrix) -> sp.csr_matrix:
    norms = np.sqrt(np.asarray(m.multiply(m).sum(axis=1)).ravel())
    norms[norms == 0] = 1.0
    return sp.csr_matrix(sp.diags(1.0 / norms) @ m)


def bm25_weight(m: sp.csr_matrix, k1: float = 1.2, b: float = 0.75) -> sp.csr_matrix:
    """BM25 weights of a documents x terms count matrix (rows are documents).

    Terms seen in many documents get a low idf; long documents are length-normalised. Used with
    items as documents and customers as terms for item-item CF (a mass buyer tells little about
    which two items belong together), and the transpose for user-user CF.
    """
    coo = sp.coo_matrix(m)
    n = coo.shape[0]
    idf = np.log(n) - np.log1p(np.bincount(coo.col, minlength=coo.shape[1]))
    lengths = np.asarray(m.sum(axis=1)).ravel()
    norm = (1.0 - b) + b * lengths / max(lengths.mean(), 1e-12)
    data = coo.data * (k1 + 1.0) / (k1 * norm[coo.row] + coo.data) * idf[coo.col]
    return sp.csr_matrix((data, (coo.row, coo.col)), shape=coo.shape)


def top_k_per_row(m: sp.csr_matrix, k: int, allow_dense: bool = True) -> sp.csr_matrix:
    """Keep the ``k`` largest entries of every row of a sparse matrix (vectorised, no row loop).

    Dense-ish matrices (item x item similarities) go through dense row chunks and ``argpartition``
    (linear time); very sparse ones through one sort of the stored entries.
    """
    m = sp.csr_matrix(m)
    m.eliminate_zeros()
    counts = np.diff(m.indptr)
    if counts.max(initial=0) <= k:
        return m
    n_rows, n_cols = m.shape
    if allow_dense and k < n_cols and n_rows * n_cols <= 50 * m.nnz:
        step = max(1, _CHUNK_CELLS // max(n_cols, 1))
        rows_out, cols_out, vals_out = [], [], []
        for start in range(0, n_rows, step):
            block = m[start:start + step].toarray()
            top = np.argpartition(-block, k, axis=1)[:, :k]
            vals = np.take_along_axis(block, top, axis=1)
            r = np.repeat(np.arange(start, start + block.shape[0]), k)
            keep = vals.ravel() != 0
            rows_out.append(r[keep])
            cols_out.append(top.ravel()[keep])
            vals_out.append(vals.ravel()[keep])
        return sp.csr_matrix((np.concatenate(vals_out), (np.concatenate(rows_out), np.concatenate(cols_out))),
                             shape=m.shape)
    rows = np.repeat(np.arange(n_rows), counts)
    order = np.lexsort((-m.data, rows))
    starts = np.repeat(m.indptr[:-1], counts)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order)) - starts  # position of each entry within its row, best first
    keep = rank < k
    return sp.csr_matrix((m.data[keep], (rows[keep], m.indices[keep])), shape=m.shape)


def _top_k_positive(block: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of the ``k`` largest positive entries of each row of a dense block (``argpartition``).

    A values-only ``np.partition`` threshold plus ``nonzero`` was tried: slower on real pool blocks.
    """
    n_rows, n_cols = block.shape
    if k >= n_cols:
        return np.nonzero(block > 0)
    top = np.argpartition(-block, k - 1, axis=1)[:, :k]  # negated: the same choice among ties as before
    keep = (np.take_along_axis(block, top, axis=1) > 0).ravel()
    return np.repeat(np.arange(n_rows), k)[keep], top.ravel()[keep]


# --------------------------------------------------------------------------------------------------
# the shared machinery


class BaseRecommender(BaseEstimator):
    """Fitting bookkeeping, chunked top-n, exclusion of bought items, popularity fill, reasons.

    Subclasses implement ``_fit_model()`` and ``_scores(history, recent, rows)`` returning a dense
    (customers x items) array, and ``_reasons(...)`` for their picks.
    """

    method = "base"
    _chunk_cells = _CHUNK_CELLS

    def fit(self, interactions: pd.DataFrame, products: pd.DataFrame | None = None) -> BaseRecommender:
        lines = prepare_interactions(interactions)
        if products is None:
            products = products_from_interactions(interactions)
        shared = getattr(_FIT_STATE, "bases", None)
        key = (id(lines), id(products), self.n_recent_baskets)
        base = shared.get(key) if shared is not None else None
        if base is None:
            base = self._fit_base(lines, products)
            if shared is not None:
                shared[key] = base
        # the same objects for every component of a hybrid fitted on these lines (read-only from here on)
        for name, value in base.items():
            setattr(self, name, value)
        self._lines = lines  # kept for subclasses' fitting only; dropped after
        self._fit_model()
        del self._lines
        return self

    def _fit_base(self, lines: pd.DataFrame, products: pd.DataFrame | None) -> dict:
        """What every recommender learns from the lines alone: indexes, history, recent baskets."""
        catalogue = lines["product_id"].unique()
        if products is not None and len(products):
            catalogue = pd.Index(catalogue).union(pd.Index(products["product_id"].astype(str)))
        self.items_ = pd.Index(pd.Index(catalogue).unique().sort_values(), name="product_id")
        customers = pd.Index(lines["customer_id"].unique(), name="customer_id").sort_values()
        products_table = self._products_table(products)
        rows = customers.get_indexer(lines["customer_id"])
        cols = self.items_.get_indexer(lines["product_id"])
        shape = (len(customers), len(self.items_))
        # customer x item: number of orders containing the item
        history = sp.csr_matrix((np.ones(len(lines), dtype=np.float32), (rows, cols)), shape=shape)
        history.sum_duplicates()
        return {
            "items_": self.items_, "customers_": customers, "products_": products_table, "names_": self.names_,
            "history_": history,
            "item_orders_": np.asarray(history.sum(axis=0)).ravel(),  # baskets containing each item
            "recent_": self._recent_baskets(lines, rows, cols, shape),
            "last_ordered_at_": lines["ordered_at"].max(),
        }

    # -- hooks
    def _fit_model(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _scores(self, history: sp.csr_matrix, recent: sp.csr_matrix, rows: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError  # pragma: no cover

    def _reasons(self, history, recent, rows, picks, picked_scores) -> np.ndarray:
        return np.full(picks.shape, f"recommended by {self.method}", dtype=object)

    # -- helpers shared by subclasses
    n_recent_baskets = 3

    def _recent_baskets(self, lines, rows, cols, shape) -> sp.csr_matrix:
        """Binary customer x item matrix of each customer's last ``n_recent_baskets`` baskets."""
        # integer work only: basket codes in basket id order (sorted once, by Arrow, not as 3M+ Python strings),
        # one lexsort by (customer, time, basket), rank from each end
        codes, uniques = pd.factorize(lines["basket_id"], sort=True)
        first = np.full(len(uniques), -1, dtype=np.int64)
        first[codes[::-1]] = np.arange(len(codes))[::-1]  # first line of each basket
        b_cust = rows[first]
        b_time = pd.to_numeric(pd.Series(lines["ordered_at"].to_numpy()[first]), errors="coerce").to_numpy()
        order = np.lexsort((np.arange(len(uniques)), b_time, b_cust))
        cust_sorted = b_cust[order]
        last_of_cust = np.r_[cust_sorted[1:] != cust_sorted[:-1], True]
        ends = np.flatnonzero(last_of_cust)
        end_of = np.repeat(ends, np.diff(np.r_[-1, ends]))
        from_end = np.empty(len(order), dtype=np.int64)
        from_end[order] = end_of - np.arange(len(order))
        mask = (from_end < self.n_recent_baskets)[codes]
        m = sp.csr_matrix((np.ones(mask.sum(), dtype=np.float32), (rows[mask], cols[mask])), shape=shape)
        m.data[:] = 1.0
        return m

    def _products_table(self, products: pd.DataFrame | None) -> pd.DataFrame:
        table = pd.DataFrame(index=self.items_)
        if products is not None and len(products):
            p = products.astype({"product_id": "str"}).drop_duplicates("product_id").set_index("product_id")
            table = table.join(p, how="left")
        name_col = next((c for c in ("product_name", "description") if c in table.columns), None)
        names = table[name_col] if name_col else pd.Series(pd.NA, index=table.index, dtype="str")
        table["display_name"] = names.fillna(pd.Series(table.index, index=table.index)).astype(str)
        self.names_ = table["display_name"].to_numpy(dtype=object)
        return table

    def _names(self, item_idx: np.ndarray) -> np.ndarray:
        return self.names_[item_idx]

    def _dense(self, name: str, build, cells: int | None = None, dtype=np.float64) -> np.ndarray | None:
        """A dense copy of a matrix (item x item unless ``cells`` says otherwise), built once per fitted
        model; None when it would exceed ``_DENSE_ITEM_CELLS`` cells.

        Kept out of the pickled model (``__getstate__``): the artifact stays sparse and small.
        """
        dense = self.__dict__.setdefault("_dense_cache", {})
        if name not in dense:
            with _DENSE_LOCK:  # scoring threads: built once, by the first thread that needs it
                if name not in dense:
                    size = len(self.items_) ** 2 if cells is None else cells
                    dense[name] = np.asarray(build(), dtype=dtype) if size <= _DENSE_ITEM_CELLS else None
        return dense[name]

    @property
    def _cache(self) -> dict | None:
        """This thread's memo of the chunk being scored (None outside a scoring call)."""
        return getattr(_CALL_STATE, "memos", {}).get(id(self))

    @_cache.setter
    def _cache(self, value: dict | None) -> None:
        memos = _CALL_STATE.__dict__.setdefault("memos", {})
        if value is None:
            memos.pop(id(self), None)
        else:
            memos[id(self)] = value

    def __getstate__(self):
        state = super().__getstate__()
        state = dict(state)
        state.pop("_dense_cache", None)
        state.pop("_cache", None)
        return state

    def _binary(self, m: sp.csr_matrix) -> sp.csr_matrix:
        b = m.copy()
        b.data[:] = 1.0
        return b

    def _popularity_scores(self) -> np.ndarray:
        return self.item_orders_.astype(np.float64)

    # -- public API
    def _check_fitted(self):
        if not hasattr(self, "history_"):
            raise RecommenderError(f"{type(self).__name__} is not fitted: call .fit(interactions) first")

    def recommend(self, customer_ids, n: int = 10, exclude_purchased: bool = True, *,
                  explain: bool = True) -> pd.DataFrame:
        """Top-``n`` items per customer. Unknown customers get popular items, said in the reason.

        ``explain=False`` skips building the reasons (empty strings): candidate generation only.
        """
        self._check_fitted()
        if n < 1:
            raise RecommenderError(f"n must be at least 1, got {n}")
        ids = pd.Index(pd.Series(list(customer_ids), dtype="str")).unique()
        rows = self.customers_.get_indexer(ids)
        known = rows >= 0
        known_rows, known_ids = rows[known], ids[known]

        def chunk_of(s, e):
            r = known_rows[s:e]
            return self._recommend_rows(known_ids[s:e], self.history_[r], self.recent_[r], r, n, exclude_purchased,
                                        explain)

        frames = self._score_chunks(len(known_rows), chunk_of)
        if (~known).any():
            frames.append(self._cold_start(ids[~known], n))
        if not frames:
            return pd.DataFrame(columns=OUTPUT_COLUMNS)
        return pd.concat(frames, ignore_index=True)[OUTPUT_COLUMNS]

    def recommend_for_basket(self, basket_items, customer_id=None, n: int = 10) -> pd.DataFrame:
        """Request time: items to add to the current basket (plus the customer's history if known).

        Items already in the basket (and, for a known customer, bought before) are not offered.
        Basket items unknown to the model are ignored; with nothing known the answer is popularity.
        """
        self._check_fitted()
        basket = pd.Index(pd.Series(list(basket_items), dtype="str")).unique()
        cols = self.items_.get_indexer(basket)
        cols = cols[cols >= 0]
        basket_vec = sp.csr_matrix((np.ones(len(cols), dtype=np.float32), (np.zeros(len(cols), dtype=np.int64), cols)),
                                   shape=(1, len(self.items_)))
        row = self.customers_.get_indexer(pd.Index([str(customer_id)]))[0] if customer_id is not None else -1
        label = pd.Index([str(customer_id) if customer_id is not None else "(anonymous)"])
        if row < 0 and len(cols) == 0:
            return self._cold_start(label, n)
        history = basket_vec if row < 0 else sp.csr_matrix(self.history_[row] + basket_vec)
        # the current basket is the most recent one: rules fire on it
        recent = basket_vec if len(cols) else self.recent_[row]
        rows = np.array([row]) if row >= 0 else None
        # the basket blend is validated on baskets alone (anonymous completion); a known customer's request
        # also carries their history, which is what the next-order blend was validated on
        return self._recommend_rows(label, history, recent, rows, n, exclude_purchased=True,
                                    basket_request=len(cols) > 0 and row < 0)[OUTPUT_COLUMNS]

    def recommend_from_lines(self, interactions: pd.DataFrame, customer_ids=None, n: int = 10,
                             exclude_purchased: bool = True, *, explain: bool = True,
                             compact: bool = False) -> pd.DataFrame:
        """Top-``n`` items per customer from *newer* order lines, with the fitted model as it is (no refit).

        The nightly score-only path: the champion's learned state (similarities, rules, pool, blend) is
        kept, while each customer's history and recent baskets come from ``interactions`` (today's
        lines), so purchases made since the model was fitted count and are not offered again. Items the
        model does not know are ignored; customers it has never seen are scored from their lines alone.
        ``customer_ids`` defaults to every customer in ``interactions``.

        Scoring a subset (an incremental night: only the customers with new orders) is this call with the
        subset's *whole* history lines (not only tonight's): the cost is linear in the lines passed and the
        customers scored, and each customer's answer does not depend on who else is scored.

        ``compact=True`` returns ``product_id``, ``method`` and ``reason`` as categoricals, made chunk by chunk:
        the nightly's frames have ~10 rows per customer, and as text ``product_id`` and ``method`` were ~0.6 GB
        more at 1M customers while the chunks were gathered and concatenated; the reasons, ~60 characters a row,
        are a few thousand distinct sentences (5,266 in the 9.5M rows of the 1M benchmark), ~0.6 GB as text.
        """
        self._check_fitted()
        if n < 1:
            raise RecommenderError(f"n must be at least 1, got {n}")
        lines = prepare_interactions(interactions)
        if customer_ids is None:
            ids = pd.Index(np.sort(lines["customer_id"].unique()), dtype="str")
        else:
            ids = pd.Index(pd.Series(list(customer_ids), dtype="str")).unique()
        r = ids.get_indexer(lines["customer_id"])
        c = self.items_.get_indexer(lines["product_id"])
        keep = (r >= 0) & (c >= 0)
        shape = (len(ids), len(self.items_))
        history = sp.csr_matrix((np.ones(keep.sum(), dtype=np.float32), (r[keep], c[keep])), shape=shape)
        history.sum_duplicates()
        # the lines as they are when every one is kept (the nightly case): no copy of 10M+ rows
        kept = lines if keep.all() else lines[keep].reset_index(drop=True)
        recent = self._recent_baskets(kept, r[keep], c[keep], shape)
        del kept
        rows = self.customers_.get_indexer(ids)  # -1: a customer the model has not seen
        del lines, r, c, keep

        # one categorical dtype for every chunk: concatenated, they stay categorical
        item_dtype = pd.CategoricalDtype(self.items_)
        method_dtype = pd.CategoricalDtype(pd.unique(pd.Series([self.method, "popularity"], dtype="str")))

        def chunk_of(s, e):
            return self._recommend_rows(ids[s:e], history[s:e], recent[s:e], rows[s:e], n, exclude_purchased,
                                        explain, categories=(item_dtype, method_dtype) if compact else None)

        frames = self._score_chunks(len(ids), chunk_of)
        if not frames:
            return pd.DataFrame(columns=OUTPUT_COLUMNS)
        if not compact:
            return pd.concat(frames, ignore_index=True)[OUTPUT_COLUMNS]
        # each chunk's reasons are a categorical of its own few sentences: unified here, not concatenated (that
        # would turn them back into one string per row)
        reasons = union_categoricals([frame.pop("reason").array for frame in frames])
        out = pd.concat(frames, ignore_index=True)
        out["reason"] = reasons
        return out[OUTPUT_COLUMNS]

    def _score_chunks(self, n_rows: int, chunk_of) -> list[pd.DataFrame]:
        """``chunk_of(start, end)`` for consecutive chunks of ``n_rows`` customers, in order.

        Chunks are independent (each customer's answer depends on their own rows only), so they are scored
        by up to ``_MAX_SCORING_THREADS`` threads; the results come back in chunk order, the same frames
        as a serial loop (the tests compare the two).
        """
        chunk = max(1, self._chunk_cells // max(len(self.items_), 1))
        bounds = [(s, min(s + chunk, n_rows)) for s in range(0, n_rows, chunk)]
        threads = min(_scoring_threads(), len(bounds))
        if threads <= 1:
            return [chunk_of(s, e) for s, e in bounds]
        with ThreadPoolExecutor(threads, thread_name_prefix="crm-score") as pool:
            return list(pool.map(lambda b: chunk_of(*b), bounds))

    def _memo(self, key, compute):
        """Reuse a chunk's intermediate (neighbours, fired rules) between scoring and explaining."""
        cache = self._cache
        if cache is None:
            return compute()
        if key not in cache:
            cache[key] = compute()
        return cache[key]

    def _parts(self) -> list[BaseRecommender]:
        return []

    def _recommend_rows(self, ids, history, recent, rows, n, exclude_purchased, explain=True,
                        basket_request=False, categories=None) -> pd.DataFrame:
        for model in [self, *self._parts()]:
            model._cache = {}
        self._cache["basket_request"] = basket_request  # a hybrid blends a request's basket differently
        try:
            return self._rank(ids, history, recent, rows, n, exclude_purchased, explain, categories)
        finally:
            for model in [self, *self._parts()]:
                model._cache = None

    def _rank(self, ids, history, recent, rows, n, exclude_purchased, explain, categories=None) -> pd.DataFrame:
        """The chunk's top-``n`` frame; with ``categories`` (the item and method dtypes of a compact scoring),
        ``product_id`` and ``method`` are categoricals made from the picks' codes (no string lookups) and
        ``reason`` a categorical of the chunk's distinct sentences."""
        # our own float64 copy (the scores may be a component's broadcast row or memo), changed in place below:
        # a chunk-sized array is allocated once, not once per step
        scores = np.array(self._scores(history, recent, rows), dtype=np.float64)
        raw_positive = scores > 0
        # ties and empty rows fall back to popularity: a tiny, strictly smaller tie-breaker
        pop = self._popularity_scores()
        scores += 1e-9 * pop / max(pop.max(), 1.0)
        if exclude_purchased:
            r, c = history.nonzero()
            scores[r, c] = -np.inf
        n_eff = min(n, scores.shape[1])
        # negated, as before: argpartition's choice among tied items (equal popularity) feeds the learned blend
        negated = np.negative(scores, out=scores)
        picks = np.argpartition(negated, n_eff - 1, axis=1)[:, :n_eff]
        picked = -np.take_along_axis(negated, picks, axis=1)
        del scores, negated
        order = np.argsort(-picked, axis=1, kind="stable")
        picks = np.take_along_axis(picks, order, axis=1)
        picked = np.take_along_axis(picked, order, axis=1)
        valid = np.isfinite(picked)  # fewer unbought items than n
        positive = np.take_along_axis(raw_positive, picks, axis=1)
        fill = ~positive
        if explain:
            reasons = np.asarray(self._reasons(history, recent, rows, picks, picked), dtype=object)
        else:
            reasons = np.full(picks.shape, "", dtype=object)
        if explain and fill.any():
            reasons[fill] = _popular_reasons(self.item_orders_[picks[fill]], "")
        keep = np.flatnonzero(valid.ravel())
        # Arrow-backed strings built per chunk: ids, items and methods are takes from small Arrow arrays (no
        # Python string per row), and the chunk's reason objects are freed here, not held until the end of a
        # 10M-row scoring (at 1M customers the object columns were most of the step's peak memory)
        item_codes, popular = picks.ravel()[keep], fill.ravel()[keep]
        reason = pd.array(reasons.ravel()[keep], dtype="str")
        if categories is None:
            items = _text(self.items_).take(item_codes)
            methods = _text([self.method, "popularity"]).take(popular.astype(np.int64))
        else:
            item_dtype, method_dtype = categories
            items = pd.Categorical.from_codes(item_codes, dtype=item_dtype)
            named = method_dtype.categories
            methods = pd.Categorical.from_codes(
                np.where(popular, named.get_loc("popularity"), named.get_loc(self.method)), dtype=method_dtype)
        return pd.DataFrame({
            "customer_id": _text(ids).take(np.repeat(np.arange(len(ids)), n_eff)[keep]),
            "rank": np.tile(np.arange(1, n_eff + 1), len(ids))[keep],
            "product_id": items,
            "score": np.where(positive, picked, 0.0).ravel()[keep],
            "method": methods,
            "reason": reason if categories is None else pd.Categorical(reason),
        })

    def _cold_start(self, ids, n) -> pd.DataFrame:
        pop = self._popularity_scores()
        n_eff = min(n, len(pop))
        top = np.argsort(-pop, kind="stable")[:n_eff]
        return pd.DataFrame({
            "customer_id": _text(ids).take(np.repeat(np.arange(len(ids)), n_eff)),
            "rank": np.tile(np.arange(1, n_eff + 1), len(ids)),
            "product_id": _text(self.items_).take(np.tile(top, len(ids))),
            "score": np.tile(pop[top] / max(pop.max(), 1.0), len(ids)),
            "method": pd.array(["popularity"] * (n_eff * len(ids)), dtype="str"),
            "reason": pd.array(["popular item (no history)"] * (n_eff * len(ids)), dtype="str"),
        })

    def _similar_bought_reasons(self, history, picks, similarity, prefix="similar to") -> np.ndarray:
        """'similar to <bought item>, <bought item>' — the bought items contributing most to a pick.

        ``similarity(target_idx, bought_idx)`` returns element-wise similarities. Vectorised over
        all (customer, pick, bought item) triples of the chunk.
        """
        h = sp.csr_matrix(history)
        n_rows, n_picks = picks.shape
        bought_per_row = np.diff(h.indptr)
        pair_row = np.repeat(np.arange(n_rows), n_picks)
        pair_item = picks.ravel()
        reps = bought_per_row[pair_row]
        pair_id = np.repeat(np.arange(len(pair_row)), reps)
        offsets = np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps, reps)
        bought = h.indices[np.repeat(h.indptr[pair_row], reps) + offsets]
        target = pair_item[pair_id]
        sims = np.asarray(similarity(target, bought), dtype=np.float64) if len(bought) else np.array([])
        ok = sims > 0
        pair_id, bought, sims = pair_id[ok], bought[ok], sims[ok]
        # best first within each pair: one lexsort, then the position of each entry inside its pair
        order = np.lexsort((-sims, pair_id))
        pair_id, bought = pair_id[order], bought[order]
        new_pair = np.r_[True, pair_id[1:] != pair_id[:-1]] if len(pair_id) else np.zeros(0, dtype=bool)
        starts = np.flatnonzero(new_pair)
        pos = np.arange(len(pair_id)) - np.repeat(starts, np.diff(np.r_[starts, len(pair_id)]))
        first = np.full(len(pair_row), None, dtype=object)
        second = np.full(len(pair_row), None, dtype=object)
        first[pair_id[pos == 0]] = self._names(bought[pos == 0])
        second[pair_id[pos == 1]] = self._names(bought[pos == 1])
        # vectorised string building (pandas' Arrow-backed str), not one f-string per pick
        text = (f"{prefix} " + pd.Series(first, dtype="str")
                + (", " + pd.Series(second, dtype="str")).fillna(""))
        out = text.fillna(f"recommended by {self.method}").to_numpy(dtype=object)
        return out.reshape(picks.shape)


def _text(values) -> pd.api.extensions.ExtensionArray:
    """``values`` as pandas' Arrow-backed string array (no copy when they already are)."""
    array = getattr(values, "array", None)
    if array is not None and isinstance(array.dtype, pd.StringDtype) and array.dtype.storage == "pyarrow":
        return array
    return pd.array(np.asarray(values, dtype=object), dtype="str")


def _scoring_threads() -> int:
    """Threads that score chunks: ``CRM_SCORING_THREADS``, else the usable cores up to ``_MAX_SCORING_THREADS``."""
    configured = os.environ.get("CRM_SCORING_THREADS", "").strip()
    if configured:
        return max(1, int(configured))
    return max(1, min(_MAX_SCORING_THREADS, len(os.sched_getaffinity(0))))


def _popular_reasons(counts: np.ndarray, when: str) -> np.ndarray:
    """'popular item (bought in 1,234 orders<when>)' for an array of counts, built column-wise."""
    counts = pd.Series(np.asarray(counts, dtype=np.int64))
    # a thousands separator for the few distinct counts, mapped back: no per-pick formatting
    distinct = counts.unique()
    text = pd.Series([f"{c:,}" for c in distinct], index=distinct, dtype="str")
    return ("popular item (bought in " + counts.map(text) + f" orders{when})").to_numpy(dtype=object)


# --------------------------------------------------------------------------------------------------
# the recommenders


class PopularityRecommender(BaseRecommender):
    """Most-bought items (number of orders containing the item), optionally in a recent window only.

    ``window_days``: count only orders in the last ``window_days`` before the latest order seen
    (seasonal catalogues: what sells now beats what sold all year).
    """

    method = "popularity"

    def __init__(self, window_days: float | None = None):
        self.window_days = window_days

    def _fit_model(self):
        lines = self._lines
        if self.window_days is not None:
            end = lines["ordered_at"].max()
            lines = lines[lines["ordered_at"] > end - pd.Timedelta(days=self.window_days)]
        # lines are distinct (customer, basket, product): an item's line count is its basket count
        cols = self.items_.get_indexer(lines["product_id"])
        self.popularity_ = np.bincount(cols, minlength=len(self.items_)).astype(np.float64)

    def _popularity_scores(self):
        return self.popularity_

    def _scores(self, history, recent, rows):
        # one read-only row broadcast over the chunk: every customer gets the same scores
        return np.broadcast_to(self.popularity_, (history.shape[0], len(self.popularity_)))

    def _reasons(self, history, recent, rows, picks, picked_scores):
        when = f" in the last {self.window_days:g} days" if self.window_days is not None else ""
        return _popular_reasons(self.popularity_[picks].ravel(), when).reshape(picks.shape)


class RuleRecommender(BaseRecommender):
    """Items implied by the customer's recent baskets through association rules.

    Either pass ``rules`` (a DataFrame from :class:`ml.baskets.AssociationRules`, product level) or
    let ``fit`` mine them from the interactions' baskets with ``min_support`` / ``min_confidence``.
    A rule fires when its whole antecedent is in the customer's last ``n_recent_baskets`` baskets
    (at request time: the current basket); an item's score is the best confidence among the rules
    that imply it (lift breaks ties), and the reason names that rule.
    """

    method = "rules"

    def __init__(self, rules: pd.DataFrame | None = None, min_support: float = 0.005, min_confidence: float = 0.1,
                 min_lift: float = 1.0, max_len: int = 3, n_recent_baskets: int = 3):
        self.rules = rules
        self.min_support = min_support
        self.min_confidence = min_confidence
        self.min_lift = min_lift
        self.max_len = max_len
        self.n_recent_baskets = n_recent_baskets

    def _fit_model(self):
        rules = self.rules
        if rules is None:
            try:
                itemsets = FrequentItemsets(min_support=self.min_support, max_len=self.max_len).fit(self._lines)
                rules = AssociationRules(min_confidence=self.min_confidence, min_lift=self.min_lift).fit(itemsets).rules_
            except BasketError:
                rules = pd.DataFrame(columns=["antecedent", "consequent", "confidence", "lift"])
        ante = [list(a) for a in rules["antecedent"]] if len(rules) else []
        cons = self.items_.get_indexer(pd.Index(rules["consequent"].astype(str))) if len(rules) else np.array([], int)
        lens = np.array([len(a) for a in ante], dtype=np.int64)
        flat = self.items_.get_indexer(pd.Index([str(x) for a in ante for x in a])) if ante else np.array([], int)
        rule_of = np.repeat(np.arange(len(ante)), lens)
        usable = np.ones(len(ante), dtype=bool)
        usable[rule_of[flat < 0]] = False  # rules about items outside the catalogue cannot fire
        usable &= cons >= 0
        keep_flat = usable[rule_of]
        self.antecedents_ = sp.csr_matrix(
            (np.ones(keep_flat.sum(), dtype=np.float32), (rule_of[keep_flat], flat[keep_flat])),
            shape=(len(ante), len(self.items_)))
        self.antecedent_len_ = np.where(usable, lens, 10**9)  # an unusable rule never fires
        self.consequent_ = np.where(usable, cons, 0)
        self.confidence_ = rules["confidence"].to_numpy(dtype=np.float64) if len(rules) else np.array([])
        self.lift_ = rules["lift"].to_numpy(dtype=np.float64) if len(rules) else np.array([])
        self.rules_ = rules.reset_index(drop=True)
        # one readable sentence per rule, built once here rather than per recommendation
        ante_names = pd.Series(self._names(np.maximum(flat, 0)), dtype=object).groupby(rule_of).agg(" + ".join)
        ante_names = ante_names.reindex(np.arange(len(ante)), fill_value="")
        self.rule_reasons_ = np.array(
            [f"bought together with {a} in {c:.0%} of baskets (lift {lf:.1f})"
             for a, c, lf in zip(ante_names, self.confidence_, self.lift_, strict=True)], dtype=object)

    def _fired(self, recent):
        return self._memo("fired", lambda: self._fire(recent))

    def _fire(self, recent):
        """The rules firing on each row's recent baskets: (row, item, rule, score) arrays, one per (row, item).

        Plain numpy (no DataFrame per chunk); the best rule of a (row, item) is kept, sorted by that key.
        """
        empty = np.zeros(0, dtype=np.int64)
        if self.antecedents_.shape[0] == 0:
            return empty, empty, empty, np.zeros(0)
        hits = sp.coo_matrix(sp.csr_matrix(recent) @ self.antecedents_.T)
        fired = hits.data >= self.antecedent_len_[hits.col] - 0.5
        row, rule = hits.row[fired].astype(np.int64), hits.col[fired].astype(np.int64)
        item = self.consequent_[rule].astype(np.int64)
        # confidence first; lift (scaled to < 1e-3 of a confidence step) breaks ties
        score = self.confidence_[rule] + 1e-6 * np.minimum(self.lift_[rule], 100.0)
        key = row * len(self.items_) + item
        order = np.lexsort((-score, key))
        key = key[order]
        first = np.r_[True, key[1:] != key[:-1]] if len(key) else np.zeros(0, dtype=bool)
        keep = order[first]
        return row[keep], item[keep], rule[keep], score[keep]

    def _scores(self, history, recent, rows):
        scores = np.zeros((recent.shape[0], len(self.items_)))  # float64: lift breaks ties at 1e-6
        row, item, _, score = self._fired(recent)
        scores[row, item] = score
        return scores

    def _reasons(self, history, recent, rows, picks, picked_scores):
        row, item, rule, _ = self._fired(recent)
        key = row * len(self.items_) + item  # sorted (see _fire)
        n_rows, n_picks = picks.shape
        wanted = np.repeat(np.arange(n_rows), n_picks) * len(self.items_) + picks.ravel()
        at = np.minimum(np.searchsorted(key, wanted), max(len(key) - 1, 0))
        has = (key[at] == wanted) if len(key) else np.zeros(len(wanted), dtype=bool)
        out = np.full(len(wanted), "recommended by rules", dtype=object)
        if has.any():
            out[has] = self.rule_reasons_[rule[at[has]]]
        return out.reshape(picks.shape)


class ItemKNNRecommender(BaseRecommender):
    """Item-based collaborative filtering on the sparse customer x item matrix.

    Item vectors are the columns of the customer x item matrix, weighted by BM25 (``weighting='bm25'``,
    customers as terms) or L2-normalised (``'cosine'``); each item keeps its ``k`` most similar items.
    A customer's score for item i sums the similarities of i to the items they bought, each bought
    item weighted by ``exp(-age / half_life_days)`` when ``half_life_days`` is set (recent purchases
    say more about the next one).
    """

    method = "item_knn"

    def __init__(self, weighting: str = "bm25", k: int = 200, k1: float = 1.2, b: float = 0.75,
                 half_life_days: float | None = None):
        self.weighting = weighting
        self.k = k
        self.k1 = k1
        self.b = b
        self.half_life_days = half_life_days

    def _fit_model(self):
        if self.weighting not in ("bm25", "cosine"):
            raise RecommenderError(f"weighting must be 'bm25' or 'cosine', got {self.weighting!r}")
        item_user = sp.csr_matrix(self.history_.T)
        w = bm25_weight(item_user, self.k1, self.b) if self.weighting == "bm25" else _l2_rows(self._binary(item_user))
        sim = sp.csr_matrix(w @ w.T)
        sim.setdiag(0.0)
        self.similarity_ = top_k_per_row(sim, self.k)  # row i: the neighbours used to score item i
        self.similarity_t_ = sp.csr_matrix(self.similarity_.T)
        if self.half_life_days is not None:
            self.history_ = _recency_weighted(self._lines, self.customers_, self.items_, self.half_life_days)

    def _scores(self, history, recent, rows):
        dense_t = self._dense("similarity_t", lambda: self.similarity_t_.toarray())
        if dense_t is not None:  # sparse x dense: no sparse product structure, no todense
            return sp.csr_matrix(history, dtype=np.float64) @ dense_t
        return np.asarray((sp.csr_matrix(history) @ self.similarity_t_).todense())

    def _reasons(self, history, recent, rows, picks, picked_scores):
        dense_t = self._dense("similarity_t", lambda: self.similarity_t_.toarray())
        if dense_t is not None:
            return self._similar_bought_reasons(history, picks, lambda t, j: dense_t[j, t])
        sim = self.similarity_
        return self._similar_bought_reasons(history, picks, lambda t, j: np.asarray(sim[t, j]).ravel())


def _recency_weighted(lines, customers, items, half_life_days) -> sp.csr_matrix:
    """customer x item matrix with each (customer, item) weighted by its last purchase's recency."""
    last = lines.groupby(["customer_id", "product_id"], sort=False)["ordered_at"].max().reset_index()
    end = lines["ordered_at"].max()
    age = (end - last["ordered_at"]) / pd.Timedelta(days=1)
    weight = np.exp(-np.log(2) * age.to_numpy(dtype=np.float64) / half_life_days)
    return sp.csr_matrix(
        (weight.astype(np.float32), (customers.get_indexer(last["customer_id"]), items.get_indexer(last["product_id"]))),
        shape=(len(customers), len(items)))


class UserKNNRecommender(BaseRecommender):
    """User-based collaborative filtering: what the ``k`` most similar customers bought.

    Customers are compared on BM25- (or cosine-) weighted purchase vectors; a candidate's score is
    the summed similarity of the neighbours who bought it.

    Neighbours are searched among a bounded pool of at most ``max_pool`` customers (those with the most
    distinct items; every customer when there are fewer): comparing every customer with every other is
    quadratic (1M x 1M), while against a fixed pool the search is linear in the customers scored and its
    memory is one (block x pool) similarity array. The most active customers are the useful neighbours
    anyway: a neighbour with two items has little to recommend. The search is ~85 % of the hybrid's
    scoring and linear in the pool, so the pool is 2,000 (was 10,000): on 100k synthetic customers the
    hybrid's validation hit-rate@10 was 0.476 / 0.471 / 0.472 with pools of 10k / 5k / 2k (user-kNN alone
    0.449 / 0.453 / 0.449; 3,000 validation customers, standard error ~0.009), and 0.466 without user-kNN.
    """

    method = "user_knn"
    _block_rows = 512  # customers compared with the pool at once: a (512 x pool) float32 array

    def __init__(self, weighting: str = "bm25", k: int = 50, k1: float = 1.2, b: float = 0.75,
                 max_pool: int = 2_000):
        self.weighting = weighting
        self.k = k
        self.k1 = k1
        self.b = b
        self.max_pool = max_pool

    def _fit_model(self):
        if self.weighting not in ("bm25", "cosine"):
            raise RecommenderError(f"weighting must be 'bm25' or 'cosine', got {self.weighting!r}")
        h = self.history_
        if self.weighting == "bm25":
            coo = sp.coo_matrix(h)
            n = h.shape[0]
            self.idf_ = np.log(n) - np.log1p(np.bincount(coo.col, minlength=h.shape[1]))
            self.avg_len_ = float(np.asarray(h.sum(axis=1)).ravel().mean())
        n_items = np.diff(h.indptr)
        if h.shape[0] > self.max_pool:
            # most distinct items first; customer order breaks ties (deterministic)
            pool = np.sort(np.argsort(-n_items, kind="stable")[:self.max_pool])
        else:
            pool = np.arange(h.shape[0])
        self.pool_ = pool
        self.pool_vectors_t_ = sp.csr_matrix(self._weigh(h[pool]).T, dtype=np.float32)
        self.pool_bought_ = sp.csr_matrix(self._binary(h[pool]), dtype=np.float32)
        # position of a customer in the pool (-1: not in it), to stop a customer being their own neighbour
        self.pool_position_ = np.full(h.shape[0], -1, dtype=np.int64)
        self.pool_position_[pool] = np.arange(len(pool))

    def _weigh(self, h) -> sp.csr_matrix:
        h = sp.csr_matrix(h, dtype=np.float64)
        if self.weighting == "cosine":
            return _l2_rows(self._binary(h))
        coo = sp.coo_matrix(h)
        lengths = np.asarray(h.sum(axis=1)).ravel()
        norm = (1.0 - self.b) + self.b * lengths / max(self.avg_len_, 1e-12)
        data = coo.data * (self.k1 + 1.0) / (self.k1 * norm[coo.row] + coo.data) * np.maximum(self.idf_[coo.col], 0)
        return _l2_rows(sp.csr_matrix((data, (coo.row, coo.col)), shape=coo.shape))

    def _neighbours(self, history, rows) -> sp.csr_matrix:
        return self._memo("neighbours", lambda: self._find_neighbours(history, rows))

    def _find_neighbours(self, history, rows) -> sp.csr_matrix:
        """(customers x pool) sparse matrix of each customer's ``k`` best neighbours (block by block)."""
        weighted = sp.csr_matrix(self._weigh(history), dtype=np.float32)
        n_pool = self.pool_vectors_t_.shape[1]
        k = min(self.k, n_pool)
        if rows is None:
            self_pos = np.full(history.shape[0], -1, dtype=np.int64)
        else:  # rows may hold -1 (a customer the model has not seen): no self to exclude
            r = np.asarray(rows)
            self_pos = np.where(r >= 0, self.pool_position_[np.maximum(r, 0)], -1)
        # the pool's vectors dense (items x pool float32, 16 MB at 2,000 x 2,000): a sparse x dense product
        # writes the block directly, with the same float32 sums in the same order as sparse x sparse
        pool_t = self._dense("pool_vectors_t", lambda: self.pool_vectors_t_.toarray(),
                             cells=int(np.prod(self.pool_vectors_t_.shape)), dtype=np.float32)
        out_rows, out_cols, out_vals = [], [], []
        for start in range(0, weighted.shape[0], self._block_rows):
            part = weighted[start:start + self._block_rows]
            block = np.asarray(part @ pool_t) if pool_t is not None else (part @ self.pool_vectors_t_).toarray()
            n = block.shape[0]
            own = self_pos[start:start + n]
            has_own = own >= 0
            block[np.flatnonzero(has_own), own[has_own]] = 0.0  # a customer is not their own neighbour
            r_top, c_top = _top_k_positive(block, k)
            out_rows.append(r_top + start)
            out_cols.append(c_top)
            out_vals.append(block[r_top, c_top])
        if not out_rows:
            return sp.csr_matrix((history.shape[0], n_pool), dtype=np.float32)
        return sp.csr_matrix((np.concatenate(out_vals), (np.concatenate(out_rows), np.concatenate(out_cols))),
                             shape=(history.shape[0], n_pool))

    def _scores(self, history, recent, rows):
        bought = self._dense("pool_bought_f32", lambda: self.pool_bought_.toarray(),
                             cells=int(np.prod(self.pool_bought_.shape)), dtype=np.float32)
        if bought is not None:  # sparse x dense, the same float32 sums as sparse x sparse
            return np.asarray(self._neighbours(history, rows) @ bought)
        return (self._neighbours(history, rows) @ self.pool_bought_).toarray()

    def _reasons(self, history, recent, rows, picks, picked_scores):
        nb = self._neighbours(history, rows)
        per_row = np.diff(nb.indptr)
        n_rows, n_picks = picks.shape
        # neighbours who bought each pick: (row, pick, neighbour) triples looked up in the pool's purchases,
        # only for the final picks (not a customers x items product)
        pair_row = np.repeat(np.arange(n_rows), n_picks)
        reps = per_row[pair_row]
        pair_id = np.repeat(np.arange(len(pair_row)), reps)
        offsets = np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps, reps)
        neighbour = nb.indices[np.repeat(nb.indptr[pair_row], reps) + offsets]
        pool_bought = self._dense("pool_bought", lambda: self.pool_bought_.toarray(),
                                  cells=int(np.prod(self.pool_bought_.shape)), dtype=np.uint8)
        if pool_bought is not None:
            bought = pool_bought[neighbour, picks.ravel()[pair_id]]
        else:
            bought = np.asarray(self.pool_bought_[neighbour, picks.ravel()[pair_id]]).ravel()
        got = np.bincount(pair_id, weights=bought, minlength=len(pair_row)).astype(np.int64)
        n_nb = per_row[pair_row].astype(np.int64)
        # one sentence per distinct (got, neighbours) pair (at most (k + 1)^2), looked up: not one per pick
        base = int(n_nb.max(initial=0)) + 1
        distinct, inverse = np.unique(got * base + n_nb, return_inverse=True)
        sentences = np.array([f"bought by {c // base} of the {c % base} customers with the most similar purchases"
                              for c in distinct.tolist()], dtype=object)
        return sentences[inverse].reshape(picks.shape)


class ContentRecommender(BaseRecommender):
    """Content-based: product attributes matched to a profile of what the customer bought.

    Item features: one-hot category, subcategory, brand and price band, plus TF-IDF of the words of
    the product name/description; each block is L2-normalised and weighted (``attribute_weight``,
    ``text_weight``) so no block dominates by size. A customer's profile is the mean of their bought
    items' features; scores are cosine similarities, so items nobody has bought yet (in ``products``
    but not in the interactions) are reachable — this is what covers cold items.
    """

    method = "content"

    def __init__(self, text_weight: float = 1.0, attribute_weight: float = 0.5, min_df: int = 2):
        self.text_weight = text_weight
        self.attribute_weight = attribute_weight
        self.min_df = min_df

    def _fit_model(self):
        from sklearn.feature_extraction.text import TfidfVectorizer

        table = self.products_
        blocks = []
        attrs = [c for c in ("category", "subcategory", "brand", "price_band") if c in table.columns]
        for col in attrs:
            values = table[col].astype("str").where(table[col].notna(), None)
            codes, uniques = pd.factorize(values)
            present = codes >= 0
            onehot = sp.csr_matrix((np.ones(present.sum()), (np.flatnonzero(present), codes[present])),
                                   shape=(len(table), max(len(uniques), 1)))
            blocks.append(self.attribute_weight * onehot)
        text_col = next((c for c in ("description", "product_name") if c in table.columns), None)
        if text_col is not None:
            text = table[text_col].fillna("").astype(str).to_numpy()
            try:
                vec = TfidfVectorizer(min_df=min(self.min_df, len(text)), stop_words="english",
                                      token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z]+\b")  # noqa: S106 - a regex
                blocks.append(self.text_weight * vec.fit_transform(text))
                self.vocabulary_size_ = len(vec.vocabulary_)
            except ValueError:  # no usable words at all
                self.vocabulary_size_ = 0
        if not blocks:
            raise RecommenderError(
                "content-based recommendations need product attributes: pass products with product_name/"
                "description, category, subcategory, brand or price_band (e.g. marts.dim_products)")
        self.features_ = _l2_rows(sp.hstack(blocks).tocsr())
        self.features_t_ = sp.csr_matrix(self.features_.T)

    def _item_similarity(self) -> np.ndarray | None:
        """Dense item x item cosine of the (L2-normalised) features, when the catalogue is small enough."""
        return self._dense("similarity", lambda: (self.features_ @ self.features_t_).toarray())

    def _scores(self, history, recent, rows):
        binary = sp.csr_matrix(self._binary(sp.csr_matrix(history)), dtype=np.float64)
        sim = self._item_similarity()
        if sim is not None:
            # profile = l2(sum of bought features): its cosine with item i is (B S)_i / sqrt(b S b')
            raw = binary @ sim
            r = np.repeat(np.arange(binary.shape[0]), np.diff(binary.indptr))
            norm2 = np.bincount(r, weights=raw[r, binary.indices], minlength=binary.shape[0])
            norm = np.sqrt(np.maximum(norm2, 0))
            norm[norm == 0] = 1.0
            raw /= norm[:, None]
            return raw
        profile = _l2_rows(binary @ self.features_)
        return np.asarray((profile @ self.features_t_).todense())

    def _reasons(self, history, recent, rows, picks, picked_scores):
        f = self.features_
        dense = self._item_similarity()

        def sim(t, j):
            if dense is not None:
                return dense[t, j]
            return np.asarray(f[t].multiply(f[j]).sum(axis=1)).ravel()

        return self._similar_bought_reasons(self._binary(sp.csr_matrix(history)), picks, sim, prefix="like")


# --------------------------------------------------------------------------------------------------
# hybrid


def holdout_last_order(lines: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
    """Split order lines for cross-sell evaluation: hide each repeat customer's last order.

    Returns ``(history, targets)``: history = every line except the hidden last orders;
    targets = per customer (index), the set of product ids in their last order they had never bought
    before. Customers with one order, or whose last order holds nothing new, have no target.
    Orders are ordered by ``ordered_at`` (basket id breaks ties).
    """
    history, targets, _ = _holdout(prepare_interactions(lines))
    return history, targets


def _holdout(lines: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series, np.ndarray]:
    """:func:`holdout_last_order` of prepared lines, plus the mask of the hidden lines.

    Integer codes instead of string sets (``isin`` of basket ids, a MultiIndex of (customer, product)) and
    one frozenset per customer from a sorted split instead of a groupby aggregation (a Python call per
    group: ~8 CPU s at 100k customers, linear in customers).
    """
    basket_codes, baskets = pd.factorize(lines["basket_id"])
    cust_codes, _ = pd.factorize(lines["customer_id"])
    hidden_basket = np.zeros(len(baskets), dtype=bool)
    hidden_basket[_last_orders(cust_codes, basket_codes, baskets, lines["ordered_at"])] = True
    is_hidden = hidden_basket[basket_codes] if len(basket_codes) else np.zeros(0, dtype=bool)
    prod_codes, products = pd.factorize(lines["product_id"])
    pair = cust_codes.astype(np.int64) * max(len(products), 1) + prod_codes
    # hidden lines of items the customer had not bought: hash the few hidden pairs and probe the rest once
    # (np.isin sorted all 10M+ pairs at 1M customers: 8 of the fit's 60 s)
    earlier = pair[~is_hidden]
    rebought = np.unique(earlier[pd.Series(earlier).isin(pair[is_hidden]).to_numpy()])
    new = is_hidden.copy()
    new[is_hidden] = ~np.isin(pair[is_hidden], rebought)
    # Python strings only for the new items' lines (not a 10M+ object copy of the columns)
    codes, customers = pd.factorize(lines["customer_id"][new], sort=True)
    order = np.argsort(codes, kind="stable")
    items = lines["product_id"][new].to_numpy(dtype=object)[order]
    ends = np.cumsum(np.bincount(codes, minlength=len(customers)))[:-1]
    targets = pd.Series([frozenset(part) for part in np.split(items, ends)] if len(customers) else [],
                        index=pd.Index(customers, name="customer_id", dtype="str"), name="product_id", dtype=object)
    return lines[~is_hidden].reset_index(drop=True), targets, is_hidden


def _last_orders(cust_codes: np.ndarray, basket_codes: np.ndarray, baskets, ordered_at: pd.Series) -> np.ndarray:
    """The basket codes of each repeat customer's last order: an order is a (customer, basket) pair dated by its
    earliest line; the last is the latest, the greatest basket id among equally dated ones (NaT counts as latest).

    On integer codes (a groupby and a sort of string columns took ~8 s at 1M customers); basket ids are compared
    as strings only among a customer's equally dated last orders.
    """
    n_baskets = max(len(baskets), 1)
    dated = basket_codes >= 0  # a line without a basket is in no order (as a groupby drops it)
    orders = pd.Series(ordered_at.to_numpy()[dated]).groupby(
        cust_codes[dated].astype(np.int64) * n_baskets + basket_codes[dated]).min()
    key = orders.index.to_numpy()
    cust, basket = key // n_baskets, key % n_baskets
    when = orders.rank(method="dense", na_option="bottom").to_numpy()  # NaT/NaN latest, as a sort puts them last
    order = np.lexsort((when, cust))
    cust, basket, when = cust[order], basket[order], when[order]
    ends = np.flatnonzero(np.r_[cust[1:] != cust[:-1], True]) if len(cust) else np.zeros(0, dtype=np.int64)
    sizes = np.diff(np.r_[-1, ends])
    end_of = np.repeat(ends, sizes)
    # the orders dated as their customer's last, for customers with two orders or more
    latest = (when == when[end_of]) & (np.repeat(sizes, sizes) >= 2)
    candidates = pd.DataFrame({"cust": cust[latest], "basket": basket[latest],
                               "basket_id": pd.Index(baskets)[basket[latest]]})
    tied = candidates["cust"].duplicated(keep=False).to_numpy()
    last_of_tied = (candidates[tied].sort_values(["cust", "basket_id"])
                    .drop_duplicates("cust", keep="last")["basket"].to_numpy())
    return np.concatenate([candidates["basket"].to_numpy()[~tied], last_of_tied])


def default_components() -> dict[str, BaseRecommender]:
    return {
        "popularity_recent": PopularityRecommender(window_days=30),
        "item_knn": ItemKNNRecommender(weighting="bm25", k=200),
        "user_knn": UserKNNRecommender(weighting="bm25", k=50),
        "content": ContentRecommender(),
        "rules": RuleRecommender(min_support=0.003),
    }


class HybridRecommender(BaseRecommender):
    """Weighted blend of recommenders, weights learned on a temporal validation split.

    ``fit``: hide each repeat customer's last order of the *training* interactions, fit the
    components on the rest, and search the blend weights (coordinate ascent over a grid) that
    maximise hit-rate@n on the hidden orders' new items; a second weight set is learned for
    customers with little history (fewer than ``min_history_items`` distinct items), where
    content-based scores cover what CF cannot. A third set is learned for *basket requests*
    ("complete this basket": one item of a hidden basket is removed, the rest is the request, the
    removed item is the target) and is used when a request carries a basket and no customer the
    model knows (anonymous or new); a known customer's basket request keeps the next-order blend,
    validated on the same situation (their history plus a recent basket). Then the components
    are refitted on everything. Each component's scores are scaled per customer to a maximum of 1
    before blending. The reason of a pick is the reason of the component contributing most to its
    blended score.

    The validation is bounded whatever the data size: at most ``max_validation_customers`` customers
    (and baskets) are ranked, and the validation components are fitted on the history of at most
    ``max_validation_fit_customers`` customers (the validation customers plus a random sample).
    """

    method = "hybrid"
    _chunk_cells = _CHUNK_CELLS // 2  # a few dense score blocks (blend, parts) are alive at once

    def __init__(self, components: dict[str, BaseRecommender] | None = None, weights: dict[str, float] | None = None,
                 n: int = 10, min_history_items: int = 5, max_validation_customers: int = 3000,
                 candidates_per_component: int = 100, max_validation_fit_customers: int = 50_000,
                 random_state: int = 0):
        self.components = components
        self.weights = weights
        self.n = n
        self.min_history_items = min_history_items
        self.max_validation_customers = max_validation_customers
        self.candidates_per_component = candidates_per_component
        self.max_validation_fit_customers = max_validation_fit_customers
        self.random_state = random_state

    def fit(self, interactions, products=None):
        comps = self.components if self.components is not None else default_components()
        self.component_names_ = list(comps)
        if products is None:
            products = products_from_interactions(interactions)
        lines = prepare_interactions(interactions)  # once, shared by every component fit below
        outer = getattr(_FIT_STATE, "bases", None)
        _FIT_STATE.bases = {} if outer is None else outer
        try:
            self._fit_all(comps, lines, products)
        finally:
            _FIT_STATE.bases = outer
        self._share_indexes()
        return self

    def _fit_all(self, comps, lines, products):
        if self.weights is not None:
            self.weights_ = {k: float(self.weights.get(k, 0.0)) for k in comps}
            self.cold_weights_ = dict(self.weights_)
            self.basket_weights_ = dict(self.weights_)
            self.validation_ = {}
        else:
            self._learn_weights(comps, lines, products)
        _FIT_STATE.bases.clear()  # the validation history's base is not needed any more
        self.fitted_components_ = {k: clone(c).fit(lines, products) for k, c in comps.items()}
        super().fit(lines, products)

    def _share_indexes(self) -> None:
        """Point the components at the hybrid's own customer/item indexes and matrices where equal.

        Fitted on the same lines, the six models hold six equal copies of the customer index and the
        customer x item matrices (hundreds of MB each at 1M customers); one shared object is kept in
        memory once and pickled once into the model artifact.
        """
        for comp in self.fitted_components_.values():
            if not (comp.customers_.equals(self.customers_) and comp.items_.equals(self.items_)):
                continue
            comp.customers_, comp.items_ = self.customers_, self.items_
            for name in ("history_", "recent_"):
                mine, theirs = getattr(self, name), getattr(comp, name)
                if mine is theirs:
                    continue
                if mine.shape == theirs.shape and mine.dtype == theirs.dtype and (mine != theirs).nnz == 0:
                    setattr(comp, name, mine)

    def _fit_model(self):
        # the components carry the models; the base class only indexes customers/items for the blend
        self.item_maps_ = {k: c.items_.get_indexer(self.items_) for k, c in self.fitted_components_.items()}
        # components over the very same items need no column remapping of each chunk
        self.same_items_ = {k: len(c.items_) == len(self.items_) and bool((cols == np.arange(len(cols))).all())
                            for (k, c), cols in zip(self.fitted_components_.items(), self.item_maps_.values(),
                                                    strict=True)}
        self.row_maps_ = {k: c.customers_ for k, c in self.fitted_components_.items()}

    def _bounded_history(self, history: pd.DataFrame, keep: pd.Index) -> pd.DataFrame:
        """The validation history of ``keep`` plus a random sample of other customers, at most
        ``max_validation_fit_customers`` customers: the validation fit costs the same at 10k and 1M."""
        customers = pd.Index(history["customer_id"].unique())
        if len(customers) <= self.max_validation_fit_customers:
            return history
        others = customers.difference(keep)
        room = max(self.max_validation_fit_customers - len(keep), 0)
        rng = np.random.default_rng(self.random_state)
        sample = others[np.sort(rng.choice(len(others), size=min(room, len(others)), replace=False))]
        return history[history["customer_id"].isin(keep.union(sample))]

    def _learn_weights(self, comps, lines, products):
        history, targets, is_hidden = _holdout(lines)
        if len(targets) == 0 or history.empty:
            self.weights_ = {k: 1.0 for k in comps}
            self.cold_weights_ = dict(self.weights_)
            self.basket_weights_ = dict(self.weights_)
            self.validation_ = {"n_customers": 0}
            return
        if len(targets) > self.max_validation_customers:
            targets = targets.sample(self.max_validation_customers, random_state=self.random_state)
        hidden = lines[is_hidden]  # the hidden last orders (history is every other line)
        baskets = _completion_baskets(hidden, self.max_validation_customers, self.random_state)
        history = self._bounded_history(history, pd.Index(targets.index))
        fitted = {k: clone(c).fit(history, products) for k, c in comps.items()}
        first = fitted[next(iter(fitted))]
        items = first.items_
        ids = targets.index
        matrices = {k: _candidate_matrix(m, ids, items, self.candidates_per_component) for k, m in fitted.items()}
        n_items = np.asarray((first.history_ > 0).sum(axis=1)).ravel()
        rows = first.customers_.get_indexer(ids)
        sizes = np.where(rows >= 0, n_items[np.maximum(rows, 0)], 0)
        truth = _truth_matrix(targets, items)
        names = list(comps)
        self.weights_, score = _search_weights(names, matrices, truth, self.n)
        cold = sizes < self.min_history_items
        if cold.sum() >= 30:
            sub = {k: m[cold] for k, m in matrices.items()}
            self.cold_weights_, cold_score = _search_weights(names, sub, truth[cold], self.n)
        else:
            self.cold_weights_, cold_score = dict(self.weights_), float("nan")
        self.validation_ = {"n_customers": len(ids), "hit_rate": score, "n_cold": int(cold.sum()),
                            "cold_hit_rate": cold_score,
                            **{f"hit_rate_{k}": _hit_rate(matrices[k], truth, self.n) for k in names}}
        self._learn_basket_weights(names, fitted, items, baskets)

    def _learn_basket_weights(self, names, fitted, items, baskets):
        """Blend for "complete this basket": rank each validation basket's hidden item from the rest."""
        request, truth = _basket_matrices(baskets, items)
        if request.shape[0] < 30:
            self.basket_weights_ = dict(self.weights_)
            self.validation_.update({"n_baskets": int(request.shape[0]), "basket_hit_rate": float("nan")})
            return
        matrices = {k: _basket_candidate_matrix(m, request, items, self.candidates_per_component)
                    for k, m in fitted.items()}
        # started from the next-order blend: the basket blend is never worse than it on these baskets
        self.basket_weights_, score = _search_weights(names, matrices, truth, self.n, start=self.weights_)
        self.validation_.update({
            "n_baskets": int(request.shape[0]), "basket_hit_rate": score,
            # the next-order blend on the same baskets: what a separate basket blend gains
            "basket_hit_rate_next_order_weights": _weights_hit_rate(names, matrices, truth, self.n, self.weights_),
            **{f"basket_hit_rate_{k}": _hit_rate(matrices[k], truth, self.n) for k in names},
        })

    def _component_inputs(self, k, comp, history, recent):
        if self.__dict__.get("same_items_", {}).get(k):
            return sp.csr_matrix(history), sp.csr_matrix(recent)
        cols = self.item_maps_[k]
        return _remap_columns(history, cols, len(comp.items_)), _remap_columns(recent, cols, len(comp.items_))

    def _component_rows(self, comp, rows):
        """The hybrid's customer rows as a component's rows (-1 where a customer is unknown to either)."""
        if rows is None:
            return None
        r = np.asarray(rows)
        if comp.customers_ is self.customers_:  # shared index (_share_indexes): same rows, no string lookup
            return r
        mapped = comp.customers_.get_indexer(self.customers_[np.maximum(r, 0)])
        return np.where(r >= 0, mapped, -1)

    def _blend(self, history, recent, rows, weights_for_row):
        """Weighted sum of the components' max-scaled scores, float32, each component on the rows that use it.

        A component whose weight is 0 for some rows of the chunk (content for warm customers, say) is
        scored on the other rows only, and its part is kept for those rows only (``subsets``: no chunk-sized
        copy that is zero elsewhere); ``_reasons`` asks it about the same rows (its memo stays valid).
        """
        n_rows = history.shape[0]
        total = np.zeros((n_rows, len(self.items_)), dtype=np.float32)
        parts, subsets = {}, {}
        for k, comp in self.fitted_components_.items():
            w = np.asarray(weights_for_row(k), dtype=np.float32)
            used = np.flatnonzero(w > 0)
            if len(used) == 0:
                continue  # a component the blend does not use costs nothing
            sub = None if len(used) == n_rows else used
            h, r = self._component_inputs(k, comp, history if sub is None else history[sub],
                                          recent if sub is None else recent[sub])
            comp_rows = self._component_rows(comp, rows if rows is None or sub is None else np.asarray(rows)[sub])
            raw = np.asarray(comp._scores(h, r, comp_rows))
            # a component scoring every customer alike (popularity) returns one row broadcast over the chunk:
            # clipped and maximised once, not per row (the same float32 values)
            alike = raw.ndim == 2 and raw.shape[0] > 1 and raw.strides[0] == 0
            s = self._clipped(k, raw[:1] if alike else raw)
            del raw
            top = s.max(axis=1)  # scaled per row to a best score of 1, then weighted
            scale = (w[used] / np.where(top > 0, top, 1.0).astype(np.float32))[:, None]
            if alike:
                s = s * scale
            else:
                s *= scale
            if sub is None:
                total += s
            else:
                total[sub] += s
            parts[k], subsets[k] = s, sub
        self._cache["subsets"] = subsets
        return total, parts

    def _clipped(self, k, raw: np.ndarray) -> np.ndarray:
        """A component's scores as float32 in the hybrid's item columns, negatives as 0."""
        if self.__dict__.get("same_items_", {}).get(k):
            return np.maximum(raw, 0, dtype=np.float32)
        cols = self.item_maps_[k]
        s = np.zeros((raw.shape[0], len(self.items_)), dtype=np.float32)
        ok = cols >= 0
        s[:, ok] = np.maximum(raw[:, cols[ok]], 0)
        return s

    def _row_weights(self, history):
        cache = self._cache or {}
        if cache.get("basket_request"):
            basket = getattr(self, "basket_weights_", self.weights_)  # models saved before basket blends
            return lambda k: np.full(history.shape[0], basket.get(k, 0.0))
        n_items = np.diff(sp.csr_matrix(history).indptr)
        cold = n_items < self.min_history_items
        return lambda k: np.where(cold, self.cold_weights_.get(k, 0.0), self.weights_.get(k, 0.0))

    def _parts(self):
        return list(self.fitted_components_.values())

    def _blended(self, history, recent, rows):
        return self._memo("blend", lambda: self._blend(history, recent, rows, self._row_weights(history)))

    def _scores(self, history, recent, rows):
        return self._blended(history, recent, rows)[0]

    def _reasons(self, history, recent, rows, picks, picked_scores):
        _, parts = self._blended(history, recent, rows)
        subsets = self._cache.get("subsets", {})
        names = list(parts)
        stacked = np.stack([_picked_part(parts[k], subsets.get(k), picks) for k in names])
        best = stacked.argmax(axis=0)
        out = np.empty(picks.shape, dtype=object)
        for m, k in enumerate(names):
            where = best == m
            if not where.any():
                continue
            comp = self.fitted_components_[k]
            cols = self.item_maps_[k]
            # the rows the component scored, so its memo of the scoring pass (neighbours, fired rules) is reused
            sub = subsets.get(k)
            h, r = self._component_inputs(k, comp, history if sub is None else history[sub],
                                          recent if sub is None else recent[sub])
            comp_rows = self._component_rows(comp, rows if rows is None or sub is None else np.asarray(rows)[sub])
            comp_picks = np.maximum(cols[picks if sub is None else picks[sub]], 0)
            reasons = np.asarray(comp._reasons(h, r, comp_rows, comp_picks,
                                               picked_scores if sub is None else picked_scores[sub]), dtype=object)
            if sub is None:
                out[where] = reasons[where]
            else:
                w_sub = where[sub]
                block = out[sub]
                block[w_sub] = reasons[w_sub]
                out[sub] = block
        return out


def _picked_part(part: np.ndarray, sub: np.ndarray | None, picks: np.ndarray) -> np.ndarray:
    """A blend part's values at the picks of every row of the chunk (0 on rows the part did not score)."""
    if sub is None:
        return np.take_along_axis(part, picks, axis=1)
    out = np.zeros(picks.shape, dtype=part.dtype)
    out[sub] = np.take_along_axis(part, picks[sub], axis=1)
    return out


def _completion_baskets(hidden: pd.DataFrame, max_baskets: int, random_state: int) -> pd.DataFrame:
    """Validation baskets for "complete this basket": up to ``max_baskets`` hidden baskets of two or more
    items, each with one item marked ``is_target`` (chosen at random, reproducibly)."""
    sizes = hidden.groupby("basket_id")["product_id"].transform("size")
    lines = hidden.loc[sizes >= 2, ["basket_id", "product_id"]]
    ids = pd.unique(lines["basket_id"])
    rng = np.random.default_rng(random_state)
    if len(ids) > max_baskets:
        ids = ids[np.sort(rng.choice(len(ids), size=max_baskets, replace=False))]
    lines = lines[lines["basket_id"].isin(ids)].reset_index(drop=True)
    key = rng.random(len(lines))
    order = np.lexsort((key, lines["basket_id"].to_numpy()))
    sorted_ids = lines["basket_id"].to_numpy()[order]
    first = np.zeros(len(lines), dtype=bool)
    if len(order):
        first[order[np.r_[True, sorted_ids[1:] != sorted_ids[:-1]]]] = True  # one random item per basket
    return lines.assign(is_target=first)


def _basket_matrices(baskets: pd.DataFrame, items: pd.Index) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """(request, truth): the visible items of each validation basket, and its hidden item, over ``items``.
    Baskets whose hidden item or whole remainder is outside ``items`` are dropped."""
    cols = items.get_indexer(baskets["product_id"])
    codes, _ = pd.factorize(baskets["basket_id"])
    target = baskets["is_target"].to_numpy()
    n = int(codes.max()) + 1 if len(codes) else 0
    known = cols >= 0
    visible = np.bincount(codes[known & ~target], minlength=n)
    has_target = np.bincount(codes[known & target], minlength=n)
    usable = (visible > 0) & (has_target > 0)
    new_row = np.cumsum(usable) - 1
    m = known & usable[codes]
    shape = (int(usable.sum()), len(items))
    request = sp.csr_matrix((np.ones((m & ~target).sum()), (new_row[codes[m & ~target]], cols[m & ~target])),
                            shape=shape)
    truth = sp.csr_matrix((np.ones((m & target).sum()), (new_row[codes[m & target]], cols[m & target])), shape=shape)
    request.data[:] = 1.0
    return request, truth


def _basket_candidate_matrix(model: BaseRecommender, request: sp.csr_matrix, items: pd.Index,
                             per_row: int) -> sp.csr_matrix:
    """A component's top candidates for anonymous basket requests (the basket is history and recent basket)."""
    cols = model.items_.get_indexer(items)
    req = _remap_columns(request, cols, len(model.items_))
    ids = pd.Index(np.arange(request.shape[0]).astype(str))
    chunk = max(1, model._chunk_cells // max(len(model.items_), 1))
    recs = pd.concat([model._recommend_rows(ids[s:s + chunk], req[s:s + chunk], req[s:s + chunk], None, per_row,
                                            True, explain=False, basket_request=True)
                      for s in range(0, request.shape[0], chunk)], ignore_index=True)
    return _scaled_candidates(recs, model.method, ids, items)


def _remap_columns(m, cols, n_cols) -> sp.csr_matrix:
    """Re-index a matrix over the hybrid's items onto a component's item index."""
    coo = sp.coo_matrix(m)
    target = cols[coo.col]
    ok = target >= 0
    return sp.csr_matrix((coo.data[ok], (coo.row[ok], target[ok])), shape=(m.shape[0], n_cols))


def _candidate_matrix(model: BaseRecommender, ids, items, per_row: int) -> sp.csr_matrix:
    """A component's top candidates per customer as a sparse (customers x items) matrix, max-scaled."""
    recs = model.recommend(ids, n=per_row, exclude_purchased=True, explain=False)
    return _scaled_candidates(recs, model.method, ids, items)


def _scaled_candidates(recs: pd.DataFrame, method: str, ids: pd.Index, items: pd.Index) -> sp.csr_matrix:
    recs = recs[recs["method"] == method]  # popularity fill is not this component's opinion
    score = recs["score"].to_numpy(dtype=np.float64)
    top = recs.groupby("customer_id")["score"].transform("max").to_numpy()
    score = np.divide(score, top, out=np.zeros_like(score), where=top > 0)
    return sp.csr_matrix((score, (ids.get_indexer(recs["customer_id"]), items.get_indexer(recs["product_id"]))),
                         shape=(len(ids), len(items)))


def _truth_matrix(targets: pd.Series, items: pd.Index) -> sp.csr_matrix:
    exploded = targets.apply(list).explode()
    cols = items.get_indexer(exploded.astype(str))
    rows = np.repeat(np.arange(len(targets)), targets.apply(len).to_numpy())
    ok = cols >= 0
    return sp.csr_matrix((np.ones(ok.sum()), (rows[ok], cols[ok])), shape=(len(targets), len(items)))


def _hit_rate(scores: sp.csr_matrix, truth: sp.csr_matrix, n: int) -> float:
    top = top_k_per_row(scores, n, allow_dense=False)
    top.data[:] = 1.0
    return float((np.asarray(top.multiply(truth).sum(axis=1)).ravel() > 0).mean())


def _candidate_table(names, matrices, truth):
    """Each validation customer's candidates as padded (customers x width) arrays, one per component.

    The blend search then costs one weighted sum and one ``argpartition`` over a small dense array
    per trial, instead of sparse additions and sorts.
    """
    parts = []
    for m, k in enumerate(names):
        coo = sp.coo_matrix(matrices[k])
        parts.append(pd.DataFrame({"row": coo.row, "col": coo.col, "comp": m, "score": coo.data}))
    long = pd.concat(parts, ignore_index=True)
    wide = long.pivot_table(index=["row", "col"], columns="comp", values="score", aggfunc="max", fill_value=0.0)
    wide = wide.reindex(columns=range(len(names)), fill_value=0.0).reset_index()
    slot = wide.groupby("row").cumcount().to_numpy()
    width = int(slot.max()) + 1 if len(slot) else 1
    rows = wide["row"].to_numpy()
    values = np.full((len(names), truth.shape[0], width), 0.0)
    values[:, rows, slot] = wide[list(range(len(names)))].to_numpy().T
    present = np.zeros((truth.shape[0], width), dtype=bool)
    present[rows, slot] = True
    is_target = np.zeros((truth.shape[0], width), dtype=bool)
    is_target[rows, slot] = np.asarray(truth[rows, wide["col"].to_numpy()]).ravel() > 0
    return values, present, is_target


def _blend_scorer(names, matrices, truth, n):
    """hit-rate@n of a weight dict on the validation candidates (one weighted sum + argpartition)."""
    values, present, is_target = _candidate_table(names, matrices, truth)
    n_eff = min(n, values.shape[2])

    def score(w):
        blend = np.tensordot(np.array([w[k] for k in names]), values, axes=1)
        blend[~present] = -np.inf
        top = np.argpartition(-blend, n_eff - 1, axis=1)[:, :n_eff]
        ok = np.take_along_axis(present & (blend > 0), top, axis=1)
        return float((np.take_along_axis(is_target, top, axis=1) & ok).any(axis=1).mean())

    return score


def _weights_hit_rate(names, matrices, truth, n, weights) -> float:
    return _blend_scorer(names, matrices, truth, n)({k: weights.get(k, 0.0) for k in names})


def _search_weights(names, matrices, truth, n, grid=(0.0, 0.1, 0.25, 0.5, 1.0, 2.0), rounds=3, start=None):
    """Coordinate ascent on the blend weights (from ``start``, default all 1), maximising validation hit-rate@n."""
    score = _blend_scorer(names, matrices, truth, n)
    weights = {k: float((start or {}).get(k, 1.0)) for k in names}
    best = score(weights)
    for _ in range(rounds):
        improved = False
        for k in names:
            for g in grid:
                if g == weights[k]:
                    continue
                trial = {**weights, k: g}
                if all(v == 0 for v in trial.values()):
                    continue
                s = score(trial)
                if s > best + 1e-12:
                    best, weights, improved = s, trial, True
        if not improved:
            break
    return weights, best
