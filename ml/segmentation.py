"""Customer segmentation over ``marts.customer_features``: candidates, evidence-based selection, readable
names and profiles.

Pure maths over DataFrames (no database, no MLflow): :func:`segment_customers` returns a
:class:`SegmentationResult` whose ``candidates`` table has one row per candidate with every metric, so the
caller can log each as an MLflow child run, and whose ``model`` (:class:`SegmentModel`) assigns new customers.

Why it is built this way:

* **Preprocessing.** Spend and counts are heavily skewed; a signed log1p (or a quantile transform to a
  normal) then standard scaling keeps a few whales from defining every cluster. NULLs that mean "not
  applicable" (``avg_days_between_orders`` with one order) get the median; constant columns are dropped.
* **Every family assigns new customers the same way it was fitted**: each candidate ends as a set of
  *prototypes* in the transformed space, each prototype mapped to a segment (KMeans: its centroids; Ward and
  HDBSCAN: the centroid of each cluster of a sample, so the O(n²) fits stay on a sample and the rest is
  assigned to the nearest centroid; SOM: its nodes, grouped into segments by Ward on the codebook), except the
  Gaussian mixture, which keeps its own ``predict`` (covariances matter there).
* **Selection by evidence.** Silhouette on a fixed-size sample (it is O(n²)), Davies–Bouldin and
  Calinski–Harabasz on all rows, and bootstrap stability (mean adjusted Rand index between the full-data
  labels and the labels from models refitted on bootstrap resamples). Candidates that are unstable or leave a
  tiny segment are ineligible; the rest are ranked on the four metrics and the best mean rank wins.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.cluster.hierarchy import fcluster, linkage
from sklearn.cluster import HDBSCAN, KMeans
from sklearn.impute import SimpleImputer
from sklearn.metrics import (
    adjusted_rand_score,
    calinski_harabasz_score,
    davies_bouldin_score,
    silhouette_score,
)
from sklearn.mixture import GaussianMixture
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, QuantileTransformer, StandardScaler

from ml.errors import CrmError

# customer_features columns that are not behaviour (ids, dates, text, demographics).
NON_FEATURE_COLUMNS = frozenset(
    {"customer_id", "as_of_date", "feature_cutoff_date", "snapshot", "horizon_days", "gender", "country",
     "acquisition_channel", "age_years", "future_spend", "has_future_purchase"}
)
MIN_CUSTOMERS = 20
# The behaviour profile the segments are drawn in, when the marts carry it: how often and how recently a
# customer buys, what an order looks like (value, lines, units) and how she buys (discounts, price level,
# season), plus the category taste as one block. Volume totals (net_spend, gross_spend, n_orders,
# n_distinct_*) are left out: they are rate x tenure and would count the frequency dimension three times;
# tenure itself says when a customer arrived, not how she behaves. Measured ARI against the generator's
# planted segments (generator -> dbt): 1,500 customers, seed 7, kmeans/ward/som k 3..6 as the test runs it:
# every numeric column 0.154, this profile (category weight 8, square-root shares) 0.398; 4,000 customers,
# seed 11, k-means k=6: 0.32 (tests/test_segmentation.py states the bar and the ceiling).
PROFILE_COLUMNS = ("recency_days", "orders_per_year", "avg_order_value", "avg_basket_size", "avg_units_per_line",
                   "discount_line_share", "avg_price_index", "q4_spend_share")
MIN_PROFILE_COLUMNS = 4  # fewer of them present (an older or foreign features mart): every numeric column
MINIBATCH_ABOVE = 50_000  # rows above which k-means is fitted on a sample of KMEANS_FIT_ROWS
# Above MINIBATCH_ABOVE rows, k-means is fitted on a seeded sample of this many rows (full KMeans, n_init 4):
# k <= 8 centroids in ~20 dimensions are pinned down by 50k rows, and MiniBatchKMeans over all 1M rows was
# 37 % of the segmentation's time at 1M (profile, all five families, k 3..8).
KMEANS_FIT_ROWS = 50_000
# Above this many customers every candidate is labelled and measured (Davies-Bouldin, Calinski-Harabasz,
# segment shares, the silhouette's own 5,000-row sample) on one fixed seeded sample of this many rows; only
# the champion assigns every customer. Labelling + the two full-data metrics of 25 candidates at 1M were
# ~50 % of the time (profile as above); both metrics are means over rows, which 200k rows estimate closely.
METRIC_ROWS = 200_000
FAMILIES = ("kmeans", "gmm", "ward", "hdbscan", "som")


class SegmentationInputError(CrmError):
    """The customer features cannot be segmented as given (empty, too few customers, no variation, inf)."""


# ---------------------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------------------
def add_derived(features: pd.DataFrame) -> pd.DataFrame:
    """``orders_per_year``: purchase occasions per year of tenure (floor 30 days, so a week-old customer with
    one order is not read as a 50-a-year buyer). A rate, unlike the n_orders total, is comparable between
    customers who joined at different times."""
    if "orders_per_year" in features.columns or not {"tenure_days", "n_orders"} <= set(features.columns):
        return features
    occasions = features["n_purchase_days"] if "n_purchase_days" in features.columns else features["n_orders"]
    tenure = np.maximum(pd.to_numeric(features["tenure_days"], errors="coerce").to_numpy(float), 30.0)
    return features.assign(orders_per_year=pd.to_numeric(occasions, errors="coerce").to_numpy(float) * 365.0 / tenure)


def _varies(col: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(col) and col.notna().any() and col.nunique(dropna=True) > 1


def profile_columns(features: pd.DataFrame) -> list[str]:
    """The segmentation inputs: :data:`PROFILE_COLUMNS` and the category shares that vary (after
    :func:`add_derived`), or every varying numeric column when fewer than :data:`MIN_PROFILE_COLUMNS` of the
    profile are present."""
    present = [c for c in PROFILE_COLUMNS if c in features.columns and _varies(features[c])]
    if len(present) < MIN_PROFILE_COLUMNS:
        return feature_columns(features)
    shares = [c for c in features.columns if c.startswith("category_share_") and _varies(features[c])]
    return present + shares


def feature_columns(features: pd.DataFrame) -> list[str]:
    """Numeric behaviour columns of ``customer_features`` that vary (constant and all-NULL columns dropped)."""
    cols = []
    for c in features.columns:
        if c in NON_FEATURE_COLUMNS or not pd.api.types.is_numeric_dtype(features[c]):
            continue
        col = features[c]
        if col.notna().any() and col.nunique(dropna=True) > 1:
            cols.append(c)
    return cols


def _signed_log1p(x):
    return np.sign(x) * np.log1p(np.abs(x))


def _shape(X, sqrt_mask=None):
    """Signed log1p for skewed amounts and counts; square root for shares (``sqrt_mask``): the Hellinger
    geometry of compositions, where a few lines bought in a rare category count for more than in log space.

    Written into one output array (``copysign(log1p(|x|), x)`` is ``sign(x) * log1p(|x|)`` to the bit): the
    plain expression held three temporaries the size of the whole matrix (~130 MB each at 1M customers)."""
    X = np.asarray(X, dtype=float)
    out = np.abs(X)
    np.log1p(out, out=out)
    np.copysign(out, X, out=out)
    if sqrt_mask is not None and np.any(sqrt_mask):
        out[:, sqrt_mask] = np.sqrt(np.clip(X[:, sqrt_mask], 0, None))
    return out


def make_preprocessor(transform: str = "log", random_state: int = 0, columns: Sequence[str] | None = None) -> Pipeline:
    """Median imputation → signed log1p (``"log"``; square root for ``category_share_*`` columns) or
    quantile-to-normal (``"quantile"``) → standard scaling."""
    if transform == "log":
        mask = np.array([c.startswith("category_share_") for c in columns]) if columns is not None else None
        shape = FunctionTransformer(_shape, kw_args={"sqrt_mask": mask}, feature_names_out="one-to-one")
    elif transform == "quantile":
        shape = QuantileTransformer(output_distribution="normal", n_quantiles=1000, subsample=100_000,
                                    random_state=random_state)
    else:
        raise SegmentationInputError(f"transform must be 'log' or 'quantile', got {transform!r}")
    # The scaler works in place: its input is always the shaping step's own fresh array.
    return make_pipeline(SimpleImputer(strategy="median"), shape, StandardScaler(copy=False))


def check_features(features: pd.DataFrame, columns: Sequence[str] | None = None) -> list[str]:
    """Raise :class:`SegmentationInputError` for input that cannot be segmented; return the feature columns."""
    if features is None or len(features) == 0:
        raise SegmentationInputError(
            "customer_features is empty: no customer has a valid order on or before as_of. "
            "Load orders and run dbt (or choose a later as_of) before segmenting."
        )
    if "customer_id" not in features.columns:
        raise SegmentationInputError("customer_features has no customer_id column; pass the marts.customer_features frame.")
    if len(features) < MIN_CUSTOMERS:
        raise SegmentationInputError(
            f"Segmentation needs at least {MIN_CUSTOMERS} customers, got {len(features)}; "
            "score a single customer with a fitted SegmentModel.predict instead."
        )
    cols = list(columns) if columns is not None else profile_columns(features)
    missing = [c for c in cols if c not in features.columns]
    if missing:
        raise SegmentationInputError(f"customer_features lacks the columns {missing}.")
    if not cols:
        raise SegmentationInputError(
            f"All {len(features)} customers have identical features (every numeric column is constant or NULL): "
            "there is nothing to segment."
        )
    values = features[cols].to_numpy(dtype=float, na_value=np.nan)
    if np.isinf(values).any():
        bad = [c for c in cols if np.isinf(features[c].to_numpy(dtype=float, na_value=np.nan)).any()]
        raise SegmentationInputError(f"customer_features has infinite values in {bad}; fix the upstream model.")
    filled = np.nan_to_num(values, nan=-1.2345e300)
    if not (filled != filled[0]).any():  # one pass, not a row sort of 1M customers (np.unique(axis=0))
        raise SegmentationInputError(f"All {len(features)} customers have identical features: nothing to segment.")
    return cols


def _block_weights(cols: Sequence[str], category_weight: float) -> np.ndarray:
    is_cat = np.array([c.startswith("category_share_") for c in cols])
    w = np.ones(len(cols))
    if is_cat.any():
        w[is_cat] = np.sqrt(category_weight / is_cat.sum())
    return w


@dataclass
class BlockWeighted:
    """A fitted preprocessor followed by fixed per-column weights (the distance metric of the segmentation)."""

    preprocessor: Pipeline
    weights: np.ndarray

    def transform(self, X) -> np.ndarray:
        Z = self.preprocessor.transform(X)
        Z *= self.weights  # in place: Z is the pipeline's own output
        return Z


# ---------------------------------------------------------------------------------------------------------
# Assignment: prototypes (or a fitted mixture) → segment
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Assigner:
    """Maps transformed rows to segment labels 0..k-1: nearest prototype, or a fitted mixture's predict."""

    prototypes: np.ndarray | None = None  # (P, d)
    prototype_label: np.ndarray | None = None  # (P,)
    mixture: GaussianMixture | None = None

    def assign(self, Z: np.ndarray, chunk: int = 50_000) -> np.ndarray:
        if self.mixture is not None:
            return self.mixture.predict(Z)
        out = np.empty(len(Z), dtype=np.int64)
        p2 = (self.prototypes**2).sum(axis=1)
        for start in range(0, len(Z), chunk):  # chunked: the distance matrix of 1M rows would not fit
            z = Z[start:start + chunk]
            d = p2[None, :] - 2 * z @ self.prototypes.T
            out[start:start + chunk] = self.prototype_label[np.argmin(d, axis=1)]
        return out

    @property
    def n_segments(self) -> int:
        if self.mixture is not None:
            return int(self.mixture.n_components)
        return int(self.prototype_label.max()) + 1


def _centroid_assigner(Z: np.ndarray, labels: np.ndarray) -> Assigner:
    """Centroids of the labelled rows (labels < 0 = noise, ignored), relabelled 0..k-1."""
    keep = labels >= 0
    uniq = np.unique(labels[keep])
    remap = np.full(labels.max() + 1 if len(uniq) else 1, -1)
    remap[uniq] = np.arange(len(uniq))
    lab = remap[labels[keep]]
    sums = np.zeros((len(uniq), Z.shape[1]))
    np.add.at(sums, lab, Z[keep])
    centroids = sums / np.bincount(lab, minlength=len(uniq))[:, None]
    return Assigner(prototypes=centroids, prototype_label=np.arange(len(uniq)))


# ---------------------------------------------------------------------------------------------------------
# Candidate families: fit(Z, k, seed) -> Assigner
# ---------------------------------------------------------------------------------------------------------
def _fit_kmeans(Z, k, seed, sample_size):
    if len(Z) > MINIBATCH_ABOVE:
        Z = _sample(Z, KMEANS_FIT_ROWS, seed)
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(Z)
    return Assigner(prototypes=km.cluster_centers_, prototype_label=np.arange(k))


def _sample(Z, size, seed):
    if len(Z) <= size:
        return Z
    return Z[np.random.default_rng(seed).choice(len(Z), size, replace=False)]


def _fit_gmm(Z, k, seed, sample_size):
    gm = GaussianMixture(n_components=k, covariance_type="full", n_init=1, reg_covar=1e-3, random_state=seed)
    return Assigner(mixture=gm.fit(_sample(Z, max(sample_size * 4, 20_000), seed)))


def _ward_tree(Z, seed, sample_size):
    """Ward's merge tree of a sample: built once, then cut at every k."""
    S = _sample(Z, sample_size, seed)
    return S, linkage(S, method="ward")


def _fit_ward(Z, k, seed, sample_size, tree=None):
    S, merges = tree if tree is not None else _ward_tree(Z, seed, sample_size)
    labels = fcluster(merges, t=k, criterion="maxclust") - 1
    return _centroid_assigner(S, labels)


def _fit_hdbscan(Z, k, seed, sample_size):
    """k is ignored (HDBSCAN finds its own number of clusters); noise points join the nearest centroid."""
    S = _sample(Z, sample_size, seed)
    min_size = max(15, len(S) // 50)
    labels = HDBSCAN(min_cluster_size=min_size, min_samples=10, copy=True).fit_predict(S)
    if labels.max() < 1:
        raise _CandidateFailed(f"HDBSCAN found {labels.max() + 1} cluster(s) on {len(S)} rows")
    return _centroid_assigner(S, labels)


def _som_codebook(Z, seed, sample_size, n_iter: int = 30):
    """Train a rectangular self-organising map and return the codebook vectors of the nodes that win rows.

    minisom sets up the map and its PCA initialisation; the training is Kohonen's batch algorithm
    (minisom's ``train_batch_offline``) written out vectorised, because minisom looks up each row's winning
    node in a Python loop (~100 µs a row per iteration), which dominated the whole segmentation run.
    """
    from minisom import MiniSom

    S = _sample(Z, max(sample_size, 10_000), seed)
    side = int(np.clip(np.sqrt(5 * np.sqrt(len(S))) / 1.2, 4, 15))  # Vesanto's 5·√n nodes rule of thumb
    som = MiniSom(side, side, S.shape[1], sigma=max(1.0, side / 3), learning_rate=0.5, random_seed=seed)
    som.pca_weights_init(S)
    W = som.get_weights().reshape(-1, S.shape[1]).copy()
    grid = np.array([(i, j) for i in range(side) for j in range(side)], dtype=float)
    grid_d2 = ((grid[:, None, :] - grid[None, :, :]) ** 2).sum(-1)  # squared distances between nodes on the map
    sigma0, sigma_end = max(1.0, side / 3), 0.5
    for it in range(n_iter):
        sigma = sigma0 * (sigma_end / sigma0) ** (it / max(n_iter - 1, 1))  # exponential shrink of the neighbourhood
        bmu = _nearest(S, W)
        h = np.exp(-grid_d2[:, bmu] / (2 * sigma**2))  # (nodes, rows)
        W = (h @ S) / np.maximum(h.sum(axis=1), 1e-12)[:, None]
    # Nodes that never win a row are dropped: they would turn into phantom segments.
    used = np.unique(_nearest(S, W))
    return W[used]


def _nearest(Z, P):
    return np.argmin((P**2).sum(1)[None, :] - 2 * Z @ P.T, axis=1)


def _fit_som(Z, k, seed, sample_size, codebook=None):
    nodes = codebook if codebook is not None else _som_codebook(Z, seed, sample_size)
    if len(nodes) < k:
        raise _CandidateFailed(f"SOM has only {len(nodes)} used nodes for k={k}")
    labels = fcluster(linkage(nodes, method="ward"), t=k, criterion="maxclust") - 1
    return Assigner(prototypes=nodes, prototype_label=labels)


class _CandidateFailed(Exception):
    """A candidate that cannot produce a segmentation on this data (recorded, not raised to the user)."""


_FITTERS: dict[str, Callable] = {
    "kmeans": _fit_kmeans,
    "gmm": _fit_gmm,
    "ward": _fit_ward,
    "hdbscan": _fit_hdbscan,
    "som": _fit_som,
}


# ---------------------------------------------------------------------------------------------------------
# The fitted model
# ---------------------------------------------------------------------------------------------------------
@dataclass
class SegmentModel:
    """Preprocessor + assigner + segment ids/names: assigns any customer_features row to a segment.

    Segment ids are 1..k ordered by the segments' total spend (1 = most revenue) so ids are stable in meaning.
    """

    candidate: str
    feature_columns: list[str]
    preprocessor: BlockWeighted
    assigner: Assigner
    label_to_segment: np.ndarray  # assigner label → segment id
    segment_names: dict[int, str] = field(default_factory=dict)
    source_columns: tuple[str, ...] = ()  # every column of the training frame (which sources derived ones had)

    def transform(self, features: pd.DataFrame) -> np.ndarray:
        features = add_derived(features)
        missing = [c for c in self.feature_columns if c not in features.columns]
        if missing:
            raise SegmentationInputError(f"Cannot assign segments: the frame lacks the feature columns {missing}.")
        X = features[self.feature_columns].to_numpy(dtype=float, na_value=np.nan)
        if np.isinf(X).any():
            raise SegmentationInputError("Cannot assign segments: the features contain infinite values.")
        return self.preprocessor.transform(pd.DataFrame(X, columns=self.feature_columns))

    @property
    def input_columns(self) -> list[str]:
        """The columns a caller must pass: the feature columns, derived ones replaced by their sources."""
        cols = [c for c in self.feature_columns if c != "orders_per_year"]
        if "orders_per_year" in self.feature_columns:
            cols += [c for c in ("tenure_days", "n_orders", "n_purchase_days") if c in self.source_columns]
        return cols

    def predict(self, features: pd.DataFrame) -> np.ndarray:
        """Segment id (1..k) of every row; NULL features take the training median."""
        if len(features) == 0:
            return np.empty(0, dtype=np.int64)
        return self.label_to_segment[self.assigner.assign(self.transform(features))]

    def predict_names(self, features: pd.DataFrame) -> np.ndarray:
        return self.names_of(self.predict(features))

    def names_of(self, segment_ids: np.ndarray) -> np.ndarray:
        """Vectorised id → name (a lookup array indexed by id, no per-row Python at 1M customers)."""
        k = len(self.label_to_segment)
        lookup = np.array([self.segment_names.get(s, f"Segment {s}") for s in range(k + 1)], dtype=object)
        return lookup[np.asarray(segment_ids, dtype=np.int64)]


@dataclass
class SegmentationResult:
    candidates: pd.DataFrame  # one row per candidate: family, k, metrics, eligible, rank_score, selected
    champion: str
    model: SegmentModel
    assignments: pd.DataFrame  # customer_id, segment_id, segment_name
    profiles: pd.DataFrame  # one row per segment
    params: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# Metrics and selection
# ---------------------------------------------------------------------------------------------------------
def clustering_metrics(Z: np.ndarray, labels: np.ndarray, *, silhouette_sample: int = 5000, seed: int = 0) -> dict:
    """Silhouette (fixed-size sample, fixed seed), Davies–Bouldin, Calinski–Harabasz, segment sizes."""
    k = len(np.unique(labels))
    counts = np.bincount(labels)
    counts = counts[counts > 0]
    out = {"n_segments": k, "min_segment_share": float(counts.min() / len(labels)) if k else 0.0}
    if k < 2 or k >= len(Z):
        return {**out, "silhouette": np.nan, "davies_bouldin": np.nan, "calinski_harabasz": np.nan}
    n_sil = min(silhouette_sample, len(Z))
    return {
        **out,
        "silhouette": float(silhouette_score(Z, labels, sample_size=n_sil, random_state=seed)),
        "davies_bouldin": float(davies_bouldin_score(Z, labels)),
        "calinski_harabasz": float(calinski_harabasz_score(Z, labels)),
    }


def _rank_candidates(table: pd.DataFrame, min_stability: float, min_segment_share: float) -> tuple[pd.Series, pd.Series]:
    """Rank eligible candidates (stable, no tiny segment, ≥ 2 segments) by silhouette, best = rank 1.

    Davies–Bouldin and Calinski–Harabasz are reported beside it but do not vote: on skewed customer data both
    reward merging behaviourally different groups into a few big clusters (CH grows with between-cluster
    spread of the whales, DB with fewer overlapping neighbours), which is the opposite of actionable segments.
    Ties in silhouette (within 0.005) go to the more stable candidate.
    """
    ok = (
        table["failed"].isna()
        & (table["n_segments"] >= 2)
        & (table["stability_ari"] >= min_stability)
        & (table["min_segment_share"] >= min_segment_share)
    )
    if not ok.any():  # nothing passes the floors: rank everything that produced a segmentation
        ok = table["failed"].isna() & (table["n_segments"] >= 2)
    sil = (table.loc[ok, "silhouette"] / 0.005).round() * 0.005
    order = pd.DataFrame({"sil": sil, "stab": table.loc[ok, "stability_ari"]}).sort_values(
        ["sil", "stab"], ascending=False, kind="stable"
    )
    ranks = pd.Series(np.arange(1, len(order) + 1, dtype=float), index=order.index)
    return ranks.reindex(table.index), ok


# ---------------------------------------------------------------------------------------------------------
# Main entry
# ---------------------------------------------------------------------------------------------------------
def segment_customers(
    features: pd.DataFrame,
    *,
    families: Sequence[str] = FAMILIES,
    k_range: Sequence[int] = range(3, 9),
    transform: str = "log",
    columns: Sequence[str] | None = None,
    category_weight: float = 8.0,
    category_names: Mapping[int, str] | None = None,
    silhouette_sample: int = 5000,
    fit_sample: int = 3000,
    n_bootstrap: int = 3,
    min_stability: float = 0.75,
    min_segment_share: float = 0.02,
    random_state: int = 0,
    n_threads: int | None = 1,
) -> SegmentationResult:
    """Fit every candidate (family × k), measure it, pick the champion, name and profile its segments.

    ``category_names`` maps the rank of ``category_share_<rank>`` to a category name (``marts.feature_categories``).
    ``category_weight``: the category_share_* columns together weigh as much as this many other features
    (each is scaled by √(weight / n_shares)). 8 = as much as the whole behaviour profile: the generator's
    segments differ in taste as much as in rates and basket shape (measured, 4,000 generated customers, k-means
    k=6, square-root shares: weight 4 → ARI 0.27, 8 → 0.32).
    ``columns`` default: :func:`profile_columns`.
    ``fit_sample`` bounds the rows of the O(n²) fits (Ward, HDBSCAN) and of the bootstrap refits.
    ``n_threads`` caps the native thread pools (1 by default: oversubscribed OpenMP/BLAS threads on a shared
    box are much slower than one; ``None`` = the libraries' defaults).
    """
    from contextlib import nullcontext

    from threadpoolctl import threadpool_limits

    with nullcontext() if n_threads is None else threadpool_limits(limits=n_threads):
        return _segment_customers(
            features, families, k_range, transform, columns, category_weight, category_names, silhouette_sample,
            fit_sample, n_bootstrap, min_stability, min_segment_share, random_state,
        )


def _segment_customers(
    features, families, k_range, transform, columns, category_weight, category_names, silhouette_sample,
    fit_sample, n_bootstrap, min_stability, min_segment_share, random_state,
) -> SegmentationResult:
    unknown = [f for f in families if f not in _FITTERS]
    if unknown:
        raise SegmentationInputError(f"Unknown segmentation families {unknown}; choose from {list(FAMILIES)}.")
    features = add_derived(features)
    cols = check_features(features, columns)
    ks = sorted({int(k) for k in k_range if 2 <= int(k) < len(features)})
    if not ks:
        raise SegmentationInputError(f"No usable k in {list(k_range)} for {len(features)} customers (need 2 <= k < n).")
    X = pd.DataFrame(features[cols].to_numpy(dtype=float, na_value=np.nan), columns=cols, copy=False)
    # Fitted and transformed in one pass (the same values as fit, then transform); X is freed right after.
    pre = make_preprocessor(transform, random_state, cols)
    weights = _block_weights(cols, category_weight)
    Z = pre.fit_transform(X)
    Z *= weights
    pre = BlockWeighted(pre, weights)
    del X
    rng = np.random.default_rng(random_state)
    # The rows every candidate is labelled and measured on: all of them, or one seeded sample (METRIC_ROWS).
    Zm = Z if len(Z) <= METRIC_ROWS else _sample(Z, METRIC_ROWS, random_state + 10_007)
    # One fixed evaluation sample for stability (same rows for every candidate), one set of bootstrap draws.
    eval_idx = rng.choice(len(Zm), min(len(Zm), silhouette_sample), replace=False)
    boot = [rng.choice(len(Z), min(len(Z), fit_sample), replace=True) for _ in range(n_bootstrap)]

    rows, assigners = [], {}
    for family in families:
        cache = {}
        if family in ("som", "ward"):  # one map / merge tree per data set; the k's only cut it differently
            build = _som_codebook if family == "som" else _ward_tree
            cache["full"] = build(Z, random_state, fit_sample)
            cache["boot"] = [build(Z[b], random_state + i + 1, fit_sample) for i, b in enumerate(boot)]
        for k in (ks if family != "hdbscan" else [0]):
            name = f"{family}_k{k}" if family != "hdbscan" else "hdbscan"
            row = {"candidate": name, "family": family, "k": k or np.nan, "failed": None}
            t0 = time.perf_counter()
            try:
                asg = _fit_one(family, Z, k, random_state, fit_sample, cache.get("full"))
                labels = asg.assign(Zm)
                row["fit_seconds"] = time.perf_counter() - t0
                row.update(clustering_metrics(Zm, labels, silhouette_sample=silhouette_sample, seed=random_state))
                row["stability_ari"] = _stability(family, Z, Zm, k, labels[eval_idx], eval_idx, boot, random_state,
                                                  fit_sample, cache.get("boot"))
                assigners[name] = asg
            except _CandidateFailed as exc:
                row.update({"fit_seconds": time.perf_counter() - t0, "failed": str(exc), "n_segments": 0,
                            "min_segment_share": 0.0, "silhouette": np.nan, "davies_bouldin": np.nan,
                            "calinski_harabasz": np.nan, "stability_ari": np.nan})
            rows.append(row)
    table = pd.DataFrame(rows).set_index("candidate")
    table["rank_score"], table["eligible"] = _rank_candidates(table, min_stability, min_segment_share)
    if table["rank_score"].notna().sum() == 0:
        raise SegmentationInputError(
            "No segmentation candidate produced two or more segments: the customers are too alike to segment "
            f"({len(features)} customers, features {cols})."
        )
    champion = str(table["rank_score"].idxmin())
    table["selected"] = table.index == champion

    asg = assigners[champion]
    labels = asg.assign(Z)
    label_to_segment = _order_by_revenue(labels, features, asg.n_segments)
    segment_ids = label_to_segment[labels]
    profiles = segment_profiles(features, segment_ids, category_names=category_names)
    names = dict(zip(profiles["segment_id"].astype(int), profiles["segment_name"], strict=True))
    model = SegmentModel(champion, cols, pre, asg, label_to_segment, names, tuple(features.columns))
    assignments = pd.DataFrame(
        {"customer_id": features["customer_id"].to_numpy(), "segment_id": segment_ids,
         "segment_name": model.names_of(segment_ids)}
    )
    params = {"transform": transform, "category_weight": category_weight, "families": ",".join(families), "k_min": min(ks), "k_max": max(ks),
              "silhouette_sample": silhouette_sample, "fit_sample": fit_sample, "n_bootstrap": n_bootstrap,
              "min_stability": min_stability, "min_segment_share": min_segment_share, "n_customers": len(features),
              "metric_rows": len(Zm),
              "n_features": len(cols), "random_state": random_state}
    return SegmentationResult(table.reset_index(), champion, model, assignments, profiles, params)


def _fit_one(family, Z, k, seed, fit_sample, prepared=None) -> Assigner:
    """``prepared``: the SOM codebook or Ward tree already built for this data (shared by every k)."""
    if family == "som":
        return _fit_som(Z, k, seed, fit_sample, prepared)
    if family == "ward":
        return _fit_ward(Z, k, seed, fit_sample, prepared)
    return _FITTERS[family](Z, k, seed, fit_sample)


def _stability(family, Z, Zm, k, ref_labels, eval_idx, boot, seed, fit_sample, codebooks) -> float:
    """Mean ARI between the candidate's labels on the evaluation rows (``eval_idx`` of the measured rows
    ``Zm``) and those of refits on bootstrap resamples (``boot``, rows of ``Z``)."""
    scores = []
    for i, b in enumerate(boot):
        try:
            asg = _fit_one(family, Z[b], k, seed + i + 1, fit_sample, codebooks[i] if codebooks else None)
        except _CandidateFailed:
            scores.append(0.0)
            continue
        scores.append(adjusted_rand_score(ref_labels, asg.assign(Zm[eval_idx])))
    return float(np.mean(scores)) if scores else np.nan


def _order_by_revenue(labels: np.ndarray, features: pd.DataFrame, k: int) -> np.ndarray:
    """assigner label → segment id 1..k, 1 = the segment with the largest total net spend."""
    spend = features["net_spend"].to_numpy(dtype=float, na_value=0.0) if "net_spend" in features.columns else np.ones(len(labels))
    totals = np.bincount(labels, weights=np.nan_to_num(spend), minlength=k)
    order = np.argsort(-totals, kind="stable")
    mapping = np.empty(k, dtype=np.int64)
    mapping[order] = np.arange(1, k + 1)
    return mapping


# ---------------------------------------------------------------------------------------------------------
# Profiles and names
# ---------------------------------------------------------------------------------------------------------
def segment_profiles(
    features: pd.DataFrame, segment_ids: np.ndarray, *, category_names: Mapping[int, str] | None = None
) -> pd.DataFrame:
    """One row per segment: size, share, revenue share, mean recency/frequency/monetary, levels, top
    categories and a readable name derived from those (see :func:`name_segment`)."""
    f = features.assign(segment_id=np.asarray(segment_ids))
    n = len(f)
    pct = pd.DataFrame(
        {
            # Percentile ranks in the population: 1 = most recent / most orders / most spend / longest tenure.
            "r": (-_col(f, "recency_days")).rank(pct=True),
            "f": _col(f, "n_orders").rank(pct=True),
            "m": _col(f, "net_spend").rank(pct=True),
            "t": _col(f, "tenure_days").rank(pct=True),
            "segment_id": f["segment_id"],
        }
    ).groupby("segment_id").mean()
    share_cols = sorted((c for c in f.columns if c.startswith("category_share_")), key=lambda c: int(c.rsplit("_", 1)[1]))
    spend = _col(f, "net_spend").fillna(0.0)
    total_spend = spend.sum()
    g = f.groupby("segment_id")
    prof = pd.DataFrame(
        {
            "n_customers": g.size(),
            "revenue": spend.groupby(f["segment_id"]).sum(),
            "mean_recency_days": _col(f, "recency_days").groupby(f["segment_id"]).mean(),
            "mean_n_orders": _col(f, "n_orders").groupby(f["segment_id"]).mean(),
            "mean_net_spend": spend.groupby(f["segment_id"]).mean(),
            "mean_avg_order_value": _col(f, "avg_order_value").groupby(f["segment_id"]).mean(),
            "mean_tenure_days": _col(f, "tenure_days").groupby(f["segment_id"]).mean(),
        }
    )
    prof["share"] = prof["n_customers"] / n
    prof["revenue_share"] = prof["revenue"] / total_spend if total_spend else np.nan
    prof["recency_level"] = pct["r"].map(_level)
    prof["frequency_level"] = pct["f"].map(_level)
    prof["monetary_level"] = pct["m"].map(_level)
    prof["tenure_level"] = pct["t"].map(_level)
    top_cats, top_lift = [], []
    if share_cols:
        seg_share = g[share_cols].mean()
        pop_share = f[share_cols].mean()
        lift = seg_share / pop_share.replace(0, np.nan)
        for sid in prof.index:
            order = seg_share.loc[sid].sort_values(ascending=False)
            order = order[order > 0]
            top_cats.append(", ".join(_cat_name(c, category_names) for c in order.index[:3]))
            best = lift.loc[sid].idxmax() if lift.loc[sid].notna().any() else None
            top_lift.append((_cat_name(best, category_names), float(lift.loc[sid, best])) if best else (None, 0.0))
    else:
        top_cats = [""] * len(prof)
        top_lift = [(None, 0.0)] * len(prof)
    prof["top_categories"] = top_cats
    prof["segment_name"] = [
        name_segment(r, f_, m, t, cat if lf >= 1.5 else None)
        for r, f_, m, t, (cat, lf) in zip(pct["r"], pct["f"], pct["m"], pct["t"], top_lift, strict=True)
    ]
    prof["segment_name"] = _deduplicate(prof["segment_name"].tolist(), prof)
    prof = prof.reset_index().sort_values("segment_id", ignore_index=True)
    return prof[["segment_id", "segment_name", "n_customers", "share", "revenue", "revenue_share",
                 "mean_recency_days", "mean_n_orders", "mean_net_spend", "mean_avg_order_value", "mean_tenure_days",
                 "recency_level", "frequency_level", "monetary_level", "tenure_level", "top_categories"]]


def _col(f: pd.DataFrame, name: str) -> pd.Series:
    if name in f.columns:
        return pd.to_numeric(f[name], errors="coerce").astype(float)
    return pd.Series(np.nan, index=f.index)


def _level(p: float) -> str:
    if not np.isfinite(p):
        return "mid"
    return "high" if p >= 0.6 else ("low" if p <= 0.4 else "mid")


def _cat_name(col: str | None, names: Mapping[int, str] | None) -> str | None:
    if col is None:
        return None
    rank = int(col.rsplit("_", 1)[1])
    return (names or {}).get(rank, f"category {rank}")


def name_segment(r: float, f: float, m: float, t: float, category: str | None = None) -> str:
    """A marketer's name from the segment's mean population percentiles of recency (1 = most recent),
    frequency, monetary and tenure, plus its over-represented category (lift ≥ 1.5) when there is one."""
    R, F, M, T = _level(r), _level(f), _level(m), _level(t)
    if R == "low":
        base = {"high": "Lapsed big spenders", "mid": "Lapsed occasional buyers", "low": "Lapsed low spenders"}[M]
        if M == "high" and F == "high":
            base = "Lapsed loyal high-value"
    elif T == "low" and F != "high":
        base = {"high": "New big spenders", "mid": "New promising", "low": "New low spenders"}[M]
    elif M == "high" and F == "high":
        base = "High-value loyal" if R == "high" else "High-value fading"
    elif M == "high":
        base = "Big spenders"
    elif F == "high":
        base = "Loyal regulars"
    elif M == "low":
        base = "Recent low spenders" if R == "high" else "Occasional low spenders"
    else:
        base = "Active mid spenders" if R == "high" else "Occasional mid spenders"
    return f"{base} · {category}" if category else base


def _deduplicate(names: list[str], prof: pd.DataFrame) -> list[str]:
    """Segments with the same name get their top category appended, then a rank (1 = more revenue)."""
    out = list(names)
    counts = pd.Series(out).value_counts()
    for name in counts[counts > 1].index:
        idx = [i for i, n in enumerate(out) if n == name]
        for i in idx:
            top = (prof["top_categories"].iloc[i] or "").split(", ")[0]
            if top and "·" not in name:
                out[i] = f"{name} · {top}"
        if len({out[i] for i in idx}) < len(idx):
            for rank, i in enumerate(idx, start=1):
                out[i] = f"{name} #{rank}"
    return out


# ---------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_k_selection(candidates: pd.DataFrame, path: str | Path) -> Path:
    """Silhouette, Davies–Bouldin, Calinski–Harabasz and stability against k, one line per family."""
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    ok = candidates[candidates["failed"].isna()]
    for ax, metric in zip(axes, ["silhouette", "davies_bouldin", "calinski_harabasz", "stability_ari"], strict=True):
        for family, part in ok.groupby("family"):
            part = part.sort_values("n_segments")
            x = part["k"].where(part["k"].notna(), part["n_segments"])
            ax.plot(x, part[metric], marker="o", ls="-" if len(part) > 1 else "none", label=family)
        chosen = ok[ok["selected"]]
        if len(chosen):
            cx = chosen["k"].where(chosen["k"].notna(), chosen["n_segments"])
            ax.scatter(cx, chosen[metric], s=150, facecolors="none", edgecolors="red", zorder=5)
        ax.set_title(metric)
        ax.set_xlabel("k")
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def plot_segment_profiles(features: pd.DataFrame, assignments: pd.DataFrame, path: str | Path,
                          columns: Sequence[str] | None = None) -> Path:
    """Heatmap of each segment's mean feature, as a z-score against the population (columns ≤ 16)."""
    plt = _plt()
    cols = list(columns) if columns is not None else feature_columns(features)[:16]
    f = features[cols].astype(float)
    z = (f - f.mean()) / f.std(ddof=0).replace(0, np.nan)
    seg = assignments.set_index("customer_id").loc[features["customer_id"], ["segment_id", "segment_name"]]
    table = z.assign(segment=(seg["segment_id"].astype(str) + " " + seg["segment_name"]).to_numpy()).groupby("segment").mean()
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(cols), 1 + 0.5 * len(table)))
    im = ax.imshow(table.to_numpy(), cmap="RdBu_r", vmin=-2, vmax=2, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(table)), table.index, fontsize=8)
    fig.colorbar(im, ax=ax, label="z-score vs population")
    ax.set_title("Segment profiles")
    return _save(fig, path)


def _save(fig, path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------
# Training entry: marts → segmentation → MLflow → ml.customer_segments / ml.segment_profiles (the I/O edge)
# ---------------------------------------------------------------------------------------------------------
MODEL_NAME = "crm_segmentation"
EXPERIMENT = "segmentation"


@dataclass
class SegmentationTrainReport:
    run_id: str
    champion_candidate: str
    model_version: str | None
    promoted: bool
    reason: str
    rows_published: dict[str, int]


def read_customer_features(conn) -> tuple[pd.DataFrame, dict[int, str]]:
    """``marts.customer_features`` (COPY out) and the names of its category_share ranks."""
    from ml.warehouse import read_frame

    features = read_frame(conn, "select * from marts.customer_features order by customer_id")
    if "customer_id" in features.columns:
        features["customer_id"] = features["customer_id"].astype(str)
    cats = read_frame(conn, "select rank, category from marts.feature_categories")
    names = {int(r): str(c) for r, c in zip(cats.get("rank", []), cats.get("category", []), strict=True)}
    return features, names


def _pyfunc(model: SegmentModel):
    """The SegmentModel as an MLflow pyfunc: features frame in, segment_id + segment_name out."""
    import mlflow.pyfunc

    class SegmentPyfunc(mlflow.pyfunc.PythonModel):
        def __init__(self, segment_model):
            self.segment_model = segment_model

        def predict(self, context, model_input, params=None):  # noqa: ARG002 - pyfunc signature
            ids = self.segment_model.predict(model_input)
            return pd.DataFrame({"segment_id": ids, "segment_name": self.segment_model.names_of(ids)})

    return SegmentPyfunc(model)


def _silhouette_in(model: SegmentModel, features: pd.DataFrame, ids: np.ndarray, sample: int = 5000) -> float:
    """Silhouette of any labelling of today's customers, measured in ``model``'s feature space (one yardstick
    for champion and challenger)."""
    Z = model.transform(features)
    if len(np.unique(ids)) < 2:
        return -1.0
    return float(silhouette_score(Z, ids, sample_size=min(sample, len(Z)), random_state=0))


def train_segmentation(
    settings,
    *,
    orchestrator_run_id: str | None = None,
    margin: float = 0.0,
    policy: str = "auto",
    **segment_kwargs,
) -> SegmentationTrainReport:
    """Read the marts, segment, log parent + one child run per candidate, register, decide the champion
    (re-scored on today's customers), and publish ml.customer_segments / ml.segment_profiles."""
    import tempfile

    import mlflow

    from ml import registry
    from ml.warehouse import connect

    registry.configure(settings)
    with connect(settings) as conn:
        features, categories = read_customer_features(conn)
    result = segment_customers(features, category_names=categories, **segment_kwargs)
    as_of = pd.Timestamp(features["as_of_date"].max()).date()
    with registry.parent_run(EXPERIMENT, as_of=as_of, run_name=f"segmentation {as_of}",
                             orchestrator_run_id=orchestrator_run_id) as parent:
        registry.log_dataset(features, "marts.customer_features", as_of)
        mlflow.log_params(result.params)
        metric_cols = ["silhouette", "davies_bouldin", "calinski_harabasz", "stability_ari", "n_segments",
                       "min_segment_share", "fit_seconds"]
        for row in result.candidates.to_dict("records"):
            with registry.child_run(row["candidate"], tags={"family": row["family"], "failed": row["failed"] or ""}):
                mlflow.log_params({"family": row["family"], "k": row["k"]})
                mlflow.log_metrics({m: float(row[m]) for m in metric_cols if np.isfinite(float(row[m]))})
        best = result.candidates.set_index("candidate").loc[result.champion]
        mlflow.log_metrics({m: float(best[m]) for m in metric_cols if np.isfinite(float(best[m]))})
        mlflow.set_tag("champion_candidate", result.champion)
        with tempfile.TemporaryDirectory() as tmp:
            registry.log_figure_png(plot_k_selection(result.candidates, Path(tmp) / "k.png"), "plots/k_selection.png")
            registry.log_figure_png(plot_segment_profiles(features, result.assignments, Path(tmp) / "p.png"),
                                    "plots/segment_profiles.png")
        mlflow.log_text(result.profiles.to_csv(index=False), "segment_profiles.csv")
        example = features[result.model.input_columns].head(5)
        info = registry.log_pyfunc_model(_pyfunc(result.model), input_example=example, registered_model_name=MODEL_NAME)
        challenger_score = _silhouette_in(result.model, features, result.assignments["segment_id"].to_numpy())

        def rescore(uri: str) -> float:
            ids = mlflow.pyfunc.load_model(uri).predict(features)["segment_id"].to_numpy()
            return _silhouette_in(result.model, features, ids)

        decision = registry.decide_promotion(
            MODEL_NAME, info.registered_model_version, challenger_score=challenger_score, score_fn=rescore,
            greater_is_better=True, margin=margin, policy=policy, metric_name="silhouette",
        )
        if decision.promoted:
            assignments, profiles = result.assignments, result.profiles
        else:  # the champion keeps serving: today's customers are assigned by it
            champion = mlflow.pyfunc.load_model(registry.champion_uri(MODEL_NAME))
            assignments, profiles = _assign_with(champion, features, categories)
        version = decision.champion_version_after
        counts = _publish_segments(settings, assignments, profiles, as_of, parent.info.run_id, version)
    return SegmentationTrainReport(parent.info.run_id, result.champion, version, decision.promoted, decision.reason, counts)


def _assign_with(pyfunc_model, features: pd.DataFrame, categories: Mapping[int, str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Assignments and profiles of today's customers under a registered segmentation model (its names kept)."""
    served = pyfunc_model.predict(features)
    assignments = pd.DataFrame({"customer_id": features["customer_id"].to_numpy(), **served})
    profiles = segment_profiles(features, assignments["segment_id"].to_numpy(), category_names=categories)
    names = dict(zip(assignments["segment_id"], assignments["segment_name"], strict=False))
    profiles["segment_name"] = profiles["segment_id"].map(names)
    return assignments, profiles


def _publish_segments(settings, assignments, profiles, as_of, run_id: str, version: str | None) -> dict[str, int]:
    from ml.publish import publish

    counts = {}
    for table, frame, key in (("customer_segments", assignments, ["customer_id"]),
                              ("segment_profiles", profiles, ["segment_id"])):
        report = publish(settings, table, frame, as_of=as_of, run_id=run_id, model_name=MODEL_NAME,
                         model_version=version, key_columns=key)
        counts[table] = report.rows if hasattr(report, "rows") else len(frame)
    return counts


def score_segmentation(settings, *, orchestrator_run_id: str | None = None) -> SegmentationTrainReport:
    """Assign today's ``marts.customer_features`` with the registered champion (no training) and publish
    ``ml.customer_segments`` / ``ml.segment_profiles``, citing a new lightweight MLflow run (tags
    ``kind=scoring``, ``as_of``, the champion version, the orchestrator run id).

    Returns the same report as :func:`train_segmentation`, with ``promoted=False``. Raises :class:`CrmError`
    when no champion is registered yet (the first night must train).
    """
    import mlflow

    from ml import registry
    from ml.warehouse import connect

    registry.configure(settings)
    version = registry.champion_version(MODEL_NAME)
    if version is None:
        raise CrmError(f"No champion registered for {MODEL_NAME}: run train_segmentation (the full nightly) before scoring.")
    with connect(settings) as conn:
        features, categories = read_customer_features(conn)
    check_features(features)  # empty / too few customers: the same clear errors as training
    champion = mlflow.pyfunc.load_model(registry.champion_uri(MODEL_NAME))
    candidate = getattr(getattr(champion.unwrap_python_model(), "segment_model", None), "candidate", "champion")
    as_of = pd.Timestamp(features["as_of_date"].max()).date()
    tags = {"kind": "scoring", "champion_version": version, "champion_candidate": candidate}
    with registry.parent_run(EXPERIMENT, as_of=as_of, run_name=f"segmentation scoring {as_of}",
                             orchestrator_run_id=orchestrator_run_id, tags=tags) as run:
        registry.log_dataset(features, "marts.customer_features", as_of, context="scoring")
        assignments, profiles = _assign_with(champion, features, categories)
        mlflow.log_metrics({"n_scored": float(len(assignments)), "n_segments": float(len(profiles))})
        counts = _publish_segments(settings, assignments, profiles, as_of, run.info.run_id, version)
    reason = f"scored with champion {MODEL_NAME} v{version} ({candidate}; no training)"
    return SegmentationTrainReport(run.info.run_id, candidate, version, False, reason, counts)
