"""Buy-'til-you-die baselines: BG/NBD (purchase counts) and Gamma-Gamma (spend per purchase), fitted by MLE.

Fader, Hardie & Lee (2005) "Counting your customers the easy way" (BG/NBD) and "RFM and CLV" (Gamma-Gamma).
The ``lifetimes`` package is not a dependency; these are the closed-form log-likelihoods and conditional
expectations, vectorised over customers and maximised with scipy (parameters optimised on the log scale,
so they stay positive without bounds).

Inputs follow the usual summary convention, per customer, in one time unit (days here):
``frequency`` = number of repeat purchase periods (distinct purchase days − 1), ``recency`` = time from the
first to the last purchase, ``T`` = time from the first purchase to the cutoff, ``monetary_value`` = mean
spend of the repeat purchase days (0 when frequency is 0).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from scipy.special import gammaln, hyp2f1

from ml.errors import CrmError


class BtydInputError(CrmError):
    """The RFM summary cannot be fitted (empty, negative values, no repeat buyers)."""


def _as_arrays(frequency, recency, T):
    x = np.asarray(frequency, dtype=float)
    tx = np.asarray(recency, dtype=float)
    t_cal = np.asarray(T, dtype=float)
    if x.size == 0:
        raise BtydInputError("BG/NBD needs at least one customer; the summary is empty.")
    if not (np.isfinite(x).all() and np.isfinite(tx).all() and np.isfinite(t_cal).all()):
        raise BtydInputError("BG/NBD inputs contain NaN or infinite values; fill or drop those customers.")
    if (x < 0).any() or (tx < 0).any() or (t_cal < tx).any():
        raise BtydInputError("BG/NBD needs frequency >= 0 and 0 <= recency <= T for every customer.")
    return x, tx, t_cal


def rfm_summary(
    transactions: pd.DataFrame,
    cutoff,
    *,
    customer_col: str = "customer_id",
    date_col: str = "date",
    value_col: str = "value",
) -> pd.DataFrame:
    """Frequency / recency / T / monetary_value per customer from transactions on or before ``cutoff``.

    Purchases are aggregated per customer and day first (the usual convention: several orders on one day are
    one purchase occasion). Times are in days.
    """
    cutoff = pd.Timestamp(cutoff)
    tx = transactions.loc[transactions[date_col] <= cutoff, [customer_col, date_col, value_col]]
    daily = tx.groupby([customer_col, tx[date_col].dt.normalize()], sort=True)[value_col].sum().reset_index()
    g = daily.groupby(customer_col)
    first = g[date_col].min()
    last = g[date_col].max()
    n_days = g.size()
    total = g[value_col].sum()
    first_value = g[value_col].first()
    frequency = (n_days - 1).astype(float)
    repeat_value = total - first_value
    out = pd.DataFrame(
        {
            "frequency": frequency,
            "recency": (last - first).dt.days.astype(float),
            "T": (cutoff - first).dt.days.astype(float),
            "monetary_value": np.where(frequency > 0, repeat_value / frequency.where(frequency > 0, 1.0), 0.0),
        }
    )
    out.index.name = customer_col
    return out


def _minimise(nll, starts, *, agree_tol: float = 1e-7):
    """Minimum of ``nll`` (log-scale parameters) over several starts.

    L-BFGS-B (numerical gradient) from every start first: on a 50k-customer BG/NBD fit it reaches the same
    optimum as Nelder-Mead + L-BFGS-B (negative log-likelihood equal to 1e-11, parameters to 1e-5) in 135
    instead of 1,169 likelihood evaluations (1.0 vs 6.8 CPU s). Only when a start fails, returns a
    non-finite value, or the starts end at different optima (a flat or multi-modal surface) is the slower,
    derivative-free Nelder-Mead run first from every start, as before.
    """
    quick = [minimize(nll, s, method="L-BFGS-B") for s in starts]
    funs = np.array([r.fun if np.isfinite(r.fun) else np.inf for r in quick])
    best = quick[int(np.argmin(funs))]
    if all(r.success for r in quick) and np.isfinite(funs).all() and np.ptp(funs) <= agree_tol * max(1.0, abs(best.fun)):
        return best
    for s in starts:
        res = minimize(nll, s, method="Nelder-Mead", options={"maxiter": 4000, "xatol": 1e-7, "fatol": 1e-10})
        res = minimize(nll, res.x, method="L-BFGS-B")
        if np.isfinite(res.fun) and res.fun < best.fun:
            best = res
    return best


class BetaGeoFitter:
    """BG/NBD: Poisson purchasing while alive (rate ~ Gamma(r, alpha)), dropout after each purchase with
    probability p ~ Beta(a, b)."""

    def __init__(self, penalizer: float = 0.0):
        self.penalizer = penalizer

    @staticmethod
    def _loglik(params, x, tx, t_cal):
        r, alpha, a, b = params
        a1 = gammaln(r + x) - gammaln(r) + r * np.log(alpha)
        a2 = gammaln(a + b) + gammaln(b + x) - gammaln(b) - gammaln(a + b + x)
        a3 = -(r + x) * np.log(alpha + t_cal)
        with np.errstate(divide="ignore", invalid="ignore"):
            a4 = np.where(
                x > 0,
                np.log(a) - np.log(np.maximum(b + x - 1, 1e-300)) - (r + x) * np.log(alpha + tx),
                -np.inf,
            )
        return a1 + a2 + np.logaddexp(a3, a4)

    @staticmethod
    def _loglik_terms(x, tx, t_cal):
        """:meth:`_loglik` as a closure that evaluates its special functions once per distinct value.

        Frequencies, recencies and ages are whole days: a 50k-customer sample holds a few dozen distinct
        frequencies and a few hundred distinct days, so ``gammaln`` and ``log`` run on those and are gathered
        per customer. Every customer's value is the same floating-point expression as in :meth:`_loglik`
        (identical to the last bit, so the optimiser's path and the fitted parameters are unchanged); only the
        number of special-function calls differs (the likelihood was ~90 % of ``prepare_training``).
        """
        ux, ix = np.unique(x, return_inverse=True)
        utx, itx = np.unique(tx, return_inverse=True)
        ut, it = np.unique(t_cal, return_inverse=True)
        repeat = x > 0

        def loglik(params):
            r, alpha, a, b = params
            a1 = (gammaln(r + ux) - gammaln(r) + r * np.log(alpha))[ix]
            a2 = (gammaln(a + b) + gammaln(b + ux) - gammaln(b) - gammaln(a + b + ux))[ix]
            rx = r + x
            a3 = -rx * np.log(alpha + ut)[it]
            with np.errstate(divide="ignore", invalid="ignore"):
                head = (np.log(a) - np.log(np.maximum(b + ux - 1, 1e-300)))[ix]
                a4 = np.where(repeat, head - rx * np.log(alpha + utx)[itx], -np.inf)
            return a1 + a2 + np.logaddexp(a3, a4)

        return loglik

    def fit(self, frequency, recency, T) -> BetaGeoFitter:
        x, tx, t_cal = _as_arrays(frequency, recency, T)
        if not (x > 0).any():
            raise BtydInputError("BG/NBD cannot be fitted: no customer has a repeat purchase.")
        scale = 10.0 / t_cal.max() if t_cal.max() > 0 else 1.0  # fit on a unit where T is O(10): better conditioned
        loglik = self._loglik_terms(x, tx * scale, t_cal * scale)

        def nll(log_params):
            params = np.exp(log_params)
            ll = loglik(params).sum()
            return -ll / x.size + self.penalizer * np.sum(params**2)

        best = _minimise(nll, (np.zeros(4), np.log([0.5, 1.0, 1.0, 5.0])))
        r, alpha, a, b = np.exp(best.x)
        self.params_ = {"r": r, "alpha": alpha / scale, "a": a, "b": b}
        self.log_likelihood_ = -best.fun * x.size
        return self

    def conditional_expected_number_of_purchases_up_to_time(self, t, frequency, recency, T) -> np.ndarray:
        """E[purchases in (T, T + t] | x, t_x, T] per customer."""
        x, tx, t_cal = _as_arrays(frequency, recency, T)
        p = self.params_
        r, alpha, a, b = p["r"], p["alpha"], p["a"], p["b"]
        t = np.asarray(t, dtype=float)
        z = t / (alpha + t_cal + t)
        hyp = hyp2f1(r + x, b + x, a + b + x - 1, z)
        num = 1.0 - ((alpha + t_cal) / (alpha + t_cal + t)) ** (r + x) * hyp
        num = num * (a + b + x - 1) / (a - 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            den = 1.0 + np.where(x > 0, a / np.maximum(b + x - 1, 1e-300) * ((alpha + t_cal) / (alpha + tx)) ** (r + x), 0.0)
        return num / den

    def conditional_probability_alive(self, frequency, recency, T) -> np.ndarray:
        x, tx, t_cal = _as_arrays(frequency, recency, T)
        p = self.params_
        r, alpha, a, b = p["r"], p["alpha"], p["a"], p["b"]
        with np.errstate(divide="ignore", invalid="ignore"):
            odds = np.where(x > 0, a / np.maximum(b + x - 1, 1e-300) * ((alpha + t_cal) / (alpha + tx)) ** (r + x), 0.0)
        return 1.0 / (1.0 + odds)


class GammaGammaFitter:
    """Gamma-Gamma spend model: transaction values ~ Gamma(p, nu), nu ~ Gamma(q, gamma); fitted on repeat buyers."""

    def __init__(self, penalizer: float = 0.0):
        self.penalizer = penalizer

    @staticmethod
    def _loglik(params, x, ms):
        """Per-customer log-likelihood (repeat buyers: frequency x > 0, mean spend ms > 0)."""
        p, q, g = params
        return (
            gammaln(p * x + q) - gammaln(p * x) - gammaln(q) + q * np.log(g)
            + (p * x - 1) * np.log(ms) + (p * x) * np.log(x) - (p * x + q) * np.log(x * ms + g)
        )

    @staticmethod
    def _loglik_terms(x, ms):
        """:meth:`_loglik` with the gammaln terms once per distinct frequency (whole days) and the logs of the
        data once per fit; each customer's term is the same expression, to the last bit (as BG/NBD's)."""
        ux, ix = np.unique(x, return_inverse=True)
        log_ms, log_x = np.log(ms), np.log(x)

        def loglik(params):
            p, q, g = params
            px = p * x
            return (
                (gammaln(p * ux + q) - gammaln(p * ux))[ix] - gammaln(q) + q * np.log(g)
                + (px - 1) * log_ms + px * log_x - (px + q) * np.log(x * ms + g)
            )

        return loglik

    def fit(self, frequency, monetary_value) -> GammaGammaFitter:
        x = np.asarray(frequency, dtype=float)
        m = np.asarray(monetary_value, dtype=float)
        keep = (x > 0) & (m > 0) & np.isfinite(m)
        if keep.sum() < 2:
            raise BtydInputError("Gamma-Gamma needs at least two repeat buyers with positive spend.")
        x, m = x[keep], m[keep]
        scale = 1.0 / np.median(m)  # spend in units of the median: O(1) parameters
        loglik = self._loglik_terms(x, m * scale)

        def nll(log_params):
            p, q, g = np.exp(log_params)
            return -loglik((p, q, g)).mean() + self.penalizer * (p**2 + q**2 + g**2)

        best = _minimise(nll, (np.zeros(3), np.log([2.0, 3.0, 1.0])))
        p, q, g = np.exp(best.x)
        self.params_ = {"p": p, "q": q, "gamma": g / scale}
        return self

    def conditional_expected_average_profit(self, frequency, monetary_value) -> np.ndarray:
        """E[spend per transaction | x, m]; the population mean for customers without repeat purchases."""
        x = np.asarray(frequency, dtype=float)
        m = np.asarray(monetary_value, dtype=float)
        p, q, g = self.params_["p"], self.params_["q"], self.params_["gamma"]
        if q <= 1:
            raise BtydInputError(f"Gamma-Gamma fit has q={q:.3f} <= 1: the expected spend is infinite.")
        return p * (g + x * m) / (p * x + q - 1)


def btyd_expected_spend(summary: pd.DataFrame, horizon: float) -> pd.DataFrame:
    """Fit BG/NBD + Gamma-Gamma on an RFM summary and predict spend over ``horizon`` (same time unit).

    Returns per customer: expected_purchases, expected_avg_value, expected_spend, p_alive.
    """
    bg = BetaGeoFitter().fit(summary["frequency"], summary["recency"], summary["T"])
    gg = GammaGammaFitter().fit(summary["frequency"], summary["monetary_value"])
    n = bg.conditional_expected_number_of_purchases_up_to_time(
        horizon, summary["frequency"], summary["recency"], summary["T"]
    )
    v = gg.conditional_expected_average_profit(summary["frequency"], summary["monetary_value"])
    return pd.DataFrame(
        {
            "expected_purchases": n,
            "expected_avg_value": v,
            "expected_spend": n * v,
            "p_alive": bg.conditional_probability_alive(summary["frequency"], summary["recency"], summary["T"]),
        },
        index=summary.index,
    )
