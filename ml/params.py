"""The nightly run's parameters: one typed, validated object and the trigger form built from it.

This module is the single source of truth for the run parameters. The Airflow DAG turns
:func:`param_specs` into ``Param`` objects (the trigger form: names, types, defaults, descriptions and
JSON-schema bounds), and its first task calls :meth:`RunParams.from_mapping` on whatever the run got (form,
REST API ``conf``, schedule defaults) so every rule is checked once more in Python — the rules JSON schema
cannot express (``k_min <= k_max``) and the ones that protect the warehouse (names, never SQL) — before
any data is touched. Nothing here imports Airflow.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from datetime import date
from typing import Any

from ml.errors import CrmError

# Clustering families the segmentation step can try: the names ml/segmentation.py's FAMILIES accepts (a
# copy, because importing ml.segmentation pulls scikit-learn into every DAG parse; a test keeps them equal).
SEGMENTATION_FAMILIES = ("kmeans", "gmm", "ward", "hdbscan", "som")
PROMOTION_POLICIES = ("auto", "never", "force")
# Retrain modes of the incremental night (ml/retrain_policy.py decides per family under "auto"; a copy of its
# RETRAIN_MODES so that parsing the DAG stays free of the ml modules; a test keeps them equal).
RETRAIN_MODES = ("auto", "always", "never")
# Which rows the dbt data tests read (ml.nightly.data_test_scope): "auto" tests the rows loaded since the last
# night whose tests passed, and every row at least weekly; "all" tests every row tonight.
DATA_TEST_MODES = ("auto", "all")

# Bounds shared by the form (JSON schema) and the Python validation, so they can never disagree.
K_BOUNDS = (2, 30)
MAX_LEN_BOUNDS = (2, 6)
HORIZON_BOUNDS = (7, 730)
RETRAIN_EVERY_BOUNDS = (1, 365)
AS_OF_BOUNDS = (date(1990, 1, 1), date(2100, 12, 31))

_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# What makes a value "look like SQL" in a message: quotes, statement separators, comments.
_SQLISH_RE = re.compile(r"[;'\"`\\]|--|/\*|\b(select|insert|update|delete|drop|alter|create|union|grant)\b", re.I)


class InvalidParams(CrmError):
    """The run parameters break a rule; the message lists every problem, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(
            "invalid run parameters (nothing was run):\n  - " + "\n  - ".join(problems)
        )


@dataclass(frozen=True)
class RunParams:
    """One nightly run's settings. Build it with :meth:`from_mapping`, which validates."""

    as_of: date | None = None
    full_refresh: bool = False
    k_min: int = 3
    k_max: int = 8
    segmentation_families: tuple[str, ...] = ("kmeans", "gmm")
    min_support: float = 0.01
    min_confidence: float = 0.2
    min_lift: float = 1.0
    max_len: int = 3
    horizon_days: int = 90
    promotion_policy: str = "auto"
    retrain: str = "auto"
    retrain_every_days: int = 7
    data_tests: str = "auto"

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any] | None) -> RunParams:
        """Validate untrusted input (a form, an API ``conf``, a CLI) and build the parameters.

        Missing keys take their defaults. Unknown keys are rejected: a typo such as ``min_suport`` would
        otherwise silently run with the default.
        """
        raw = dict(raw or {})
        problems: list[str] = []
        known = {f.name for f in fields(cls)}
        for key in sorted(set(raw) - known):
            problems.append(f"unknown parameter {_show(key)}; known parameters: {', '.join(sorted(known))}")

        defaults = cls()
        values: dict[str, Any] = {}

        def take(name: str, parse) -> None:
            if name not in raw or raw[name] is None and name != "as_of":
                values[name] = getattr(defaults, name)
                return
            try:
                values[name] = parse(raw[name])
            except _Bad as bad:
                problems.append(f"{name}: {bad}")
                values[name] = getattr(defaults, name)

        take("as_of", _parse_as_of)
        take("full_refresh", _parse_bool)
        take("k_min", lambda v: _parse_int(v, *K_BOUNDS))
        take("k_max", lambda v: _parse_int(v, *K_BOUNDS))
        take("segmentation_families", _parse_families)
        take("min_support", lambda v: _parse_fraction(v))
        take("min_confidence", lambda v: _parse_fraction(v))
        take("min_lift", _parse_lift)
        take("max_len", lambda v: _parse_int(v, *MAX_LEN_BOUNDS))
        take("horizon_days", lambda v: _parse_int(v, *HORIZON_BOUNDS))
        take("promotion_policy", lambda v: _parse_choice(v, PROMOTION_POLICIES))
        take("retrain", lambda v: _parse_choice(v, RETRAIN_MODES))
        take("retrain_every_days", lambda v: _parse_int(v, *RETRAIN_EVERY_BOUNDS))
        take("data_tests", lambda v: _parse_choice(v, DATA_TEST_MODES))

        if values["k_min"] > values["k_max"]:
            problems.append(
                f"k_min ({values['k_min']}) is greater than k_max ({values['k_max']}): "
                "the segmentation k range must satisfy k_min <= k_max"
            )
        if problems:
            raise InvalidParams(problems)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (XCom, MLflow params, the run summary)."""
        out = asdict(self)
        out["as_of"] = self.as_of.isoformat() if self.as_of else None
        out["segmentation_families"] = list(self.segmentation_families)
        return out


def param_specs() -> dict[str, dict[str, Any]]:
    """The trigger form: ``name -> {default, description, <JSON-schema keys>}``.

    The DAG does ``Param(**spec)`` for each entry. Bounds repeat the ones :meth:`RunParams.from_mapping`
    enforces, so the form catches a bad value while typing and the first task catches the rest.
    """
    d = RunParams()
    return {
        "as_of": {
            "default": None,
            "type": ["null", "string"],
            "format": "date",
            "title": "As-of date",
            "description": (
                "Business date the run is computed for (YYYY-MM-DD): orders after it are ignored and "
                "its outputs replace that date's outputs. Empty: the latest order date not after the "
                "day before the run's logical date (so nightly runs and backfills pick their own day)."
            ),
        },
        "full_refresh": {
            "default": d.full_refresh,
            "type": "boolean",
            "title": "Full refresh",
            "description": "Rebuild incremental dbt models from scratch (dbt --full-refresh).",
        },
        "k_min": {
            "default": d.k_min,
            "type": "integer",
            "minimum": K_BOUNDS[0],
            "maximum": K_BOUNDS[1],
            "title": "Segments: smallest k",
            "description": "Smallest number of segments tried by the segmentation model selection.",
        },
        "k_max": {
            "default": d.k_max,
            "type": "integer",
            "minimum": K_BOUNDS[0],
            "maximum": K_BOUNDS[1],
            "title": "Segments: largest k",
            "description": "Largest number of segments tried; must be >= k_min.",
        },
        "segmentation_families": {
            "default": list(d.segmentation_families),
            "type": "array",
            "items": {"type": "string", "enum": list(SEGMENTATION_FAMILIES)},
            "examples": list(SEGMENTATION_FAMILIES),
            "minItems": 1,
            "uniqueItems": True,
            "title": "Segmentation model families",
            "description": "Clustering families compared for segmentation (best by validation score wins).",
        },
        "min_support": {
            "default": d.min_support,
            "type": "number",
            "exclusiveMinimum": 0,
            "maximum": 1,
            "title": "Rules: minimum support",
            "description": "Minimum share of baskets containing an itemset, in (0, 1].",
        },
        "min_confidence": {
            "default": d.min_confidence,
            "type": "number",
            "exclusiveMinimum": 0,
            "maximum": 1,
            "title": "Rules: minimum confidence",
            "description": "Minimum P(consequent | antecedent) of a published rule, in (0, 1].",
        },
        "min_lift": {
            "default": d.min_lift,
            "type": "number",
            "minimum": 0,
            "maximum": 1000,
            "title": "Rules: minimum lift",
            "description": "Minimum lift of a published rule (1 = no better than chance).",
        },
        "max_len": {
            "default": d.max_len,
            "type": "integer",
            "minimum": MAX_LEN_BOUNDS[0],
            "maximum": MAX_LEN_BOUNDS[1],
            "title": "Rules: maximum itemset length",
            "description": "Largest itemset mined (antecedent + consequent items).",
        },
        "horizon_days": {
            "default": d.horizon_days,
            "type": "integer",
            "minimum": HORIZON_BOUNDS[0],
            "maximum": HORIZON_BOUNDS[1],
            "title": "CLV horizon (days)",
            "description": "Window the customer value and churn models predict (spend in the next N days).",
        },
        "promotion_policy": {
            "default": d.promotion_policy,
            "type": "string",
            "enum": list(PROMOTION_POLICIES),
            "title": "Champion promotion",
            "description": (
                "auto: a challenger becomes champion only if it beats the champion on the holdout metric; "
                "never: log and register but keep the champion; force: promote the new model."
            ),
        },
        "retrain": {
            "default": d.retrain,
            "type": "string",
            "enum": list(RETRAIN_MODES),
            "title": "Retrain models",
            "description": (
                "auto: retrain a family when it has no champion, its champion is older than "
                "retrain_every_days, or the number of customers changed by more than 20 % since it was "
                "trained; otherwise score today's customers with the champion. always: retrain every "
                "family. never: score with the champions (a family without one is still trained)."
            ),
        },
        "retrain_every_days": {
            "default": d.retrain_every_days,
            "type": "integer",
            "minimum": RETRAIN_EVERY_BOUNDS[0],
            "maximum": RETRAIN_EVERY_BOUNDS[1],
            "title": "Retrain at least every N days",
            "description": "Under retrain=auto, a champion trained more than this many days before as_of is retrained.",
        },
        "data_tests": {
            "default": d.data_tests,
            "type": "string",
            "enum": list(DATA_TEST_MODES),
            "title": "dbt data tests",
            "description": (
                "auto: the data tests of tables with a load time read the rows loaded since the last night "
                "whose tests passed (and every row on a full refresh and at least once every 7 days); "
                "all: every test reads every row tonight."
            ),
        },
    }


# ---------------------------------------------------------------------------------------------------------
# Parsers: each returns the typed value or raises _Bad with a message that names the value and the rule.
# ---------------------------------------------------------------------------------------------------------
class _Bad(ValueError):
    pass


def _show(value: Any) -> str:
    """A value for a message: repr, shortened, and flagged when it looks like an injection attempt."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    if isinstance(value, str) and _SQLISH_RE.search(value):
        text += " (looks like SQL; parameters are plain values, never SQL)"
    return text


def _parse_as_of(value: Any) -> date | None:
    if value is None or value == "":
        return None
    if isinstance(value, date):
        day = value
    elif isinstance(value, str) and _DATE_RE.match(value.strip()):
        try:
            day = date.fromisoformat(value.strip())
        except ValueError:
            raise _Bad(f"{_show(value)} is not a real calendar date") from None
    else:
        raise _Bad(f"{_show(value)} is not a date in the form YYYY-MM-DD (or empty for the default)")
    if not AS_OF_BOUNDS[0] <= day <= AS_OF_BOUNDS[1]:
        raise _Bad(f"{day.isoformat()} is outside {AS_OF_BOUNDS[0]} .. {AS_OF_BOUNDS[1]}")
    return day


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _Bad(f"{_show(value)} is not true or false")


def _number(value: Any) -> float:
    # bool is an int in Python; true/false for a threshold is a mistake, not 1/0.
    if isinstance(value, bool):
        raise _Bad(f"{_show(value)} is not a number")
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:  # a JSON integer beyond float range (the REST API accepts any size)
            raise _Bad("the number is too large to be a threshold (beyond ±1.8e308)") from None
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise _Bad(f"{_show(value)} is not a number") from None
    else:
        raise _Bad(f"{_show(value)} is not a number")
    if not math.isfinite(number):
        raise _Bad(f"{_show(value)} is not a finite number")
    return number


def _parse_int(value: Any, low: int, high: int) -> int:
    number = _number(value)
    if number != int(number):
        raise _Bad(f"{_show(value)} is not a whole number")
    if not low <= number <= high:
        raise _Bad(f"{int(number)} is outside {low} .. {high}")
    return int(number)


def _parse_fraction(value: Any) -> float:
    number = _number(value)
    if not 0 < number <= 1:
        raise _Bad(f"{number:g} is outside (0, 1]: it is a share of baskets, e.g. 0.01 for 1 %")
    return number


def _parse_lift(value: Any) -> float:
    number = _number(value)
    if not 0 <= number <= 1000:
        raise _Bad(f"{number:g} is outside 0 .. 1000")
    return number


def _parse_choice(value: Any, choices: tuple[str, ...]) -> str:
    if isinstance(value, str) and value.strip().lower() in choices:
        return value.strip().lower()
    raise _Bad(f"{_show(value)} is not one of {', '.join(choices)}")


def _parse_families(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        # A comma-separated string from a CLI flag.
        value = [part for part in value.split(",") if part.strip()]
    if not isinstance(value, list | tuple) or not value:
        raise _Bad(f"{_show(value)} is not a non-empty list of {', '.join(SEGMENTATION_FAMILIES)}")
    chosen: list[str] = []
    for item in value:
        family = _parse_choice(item, SEGMENTATION_FAMILIES)
        if family not in chosen:
            chosen.append(family)
    return tuple(chosen)
