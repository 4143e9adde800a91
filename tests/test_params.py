"""The run parameters: one typed object, validated with messages that name the value and the rule, and the
trigger form's JSON schema built from the same bounds."""

from __future__ import annotations

from datetime import date

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ml.params import PROMOTION_POLICIES, SEGMENTATION_FAMILIES, InvalidParams, RunParams, param_specs


def _problems(raw) -> str:
    with pytest.raises(InvalidParams) as err:
        RunParams.from_mapping(raw)
    return str(err.value)


def test_defaults_are_valid_and_round_trip():
    params = RunParams.from_mapping({})
    assert params == RunParams()
    assert RunParams.from_mapping(params.to_dict()) == params


def test_form_values_are_parsed_to_types():
    params = RunParams.from_mapping(
        {"as_of": "2025-06-30", "full_refresh": "true", "k_min": 4, "k_max": "6", "min_support": "0.05",
         "segmentation_families": "kmeans, som", "promotion_policy": "Force", "horizon_days": 30.0}
    )
    assert params.as_of == date(2025, 6, 30)
    assert params.full_refresh is True
    assert (params.k_min, params.k_max) == (4, 6)
    assert params.min_support == 0.05
    assert params.segmentation_families == ("kmeans", "som")
    assert params.promotion_policy == "force"
    assert params.horizon_days == 30


def test_k_min_above_k_max_is_rejected_with_both_values():
    message = _problems({"k_min": 9, "k_max": 4})
    assert "k_min (9) is greater than k_max (4)" in message


@pytest.mark.parametrize("support", [0, -0.1, 1.5, "nan", "inf"])
def test_support_outside_unit_interval_is_rejected(support):
    message = _problems({"min_support": support})
    assert "min_support" in message
    assert "(0, 1]" in message or "finite" in message


def test_every_problem_is_reported_at_once():
    message = _problems({"k_min": 1, "min_confidence": 2, "promotion_policy": "sometimes", "max_len": 1})
    for name in ("k_min", "min_confidence", "promotion_policy", "max_len"):
        assert f"- {name}:" in message


@pytest.mark.parametrize(
    "raw, name",
    [
        ({"segmentation_families": ["kmeans'; drop table ml.customer_segments; --"]}, "segmentation_families"),
        ({"as_of": "2025-01-01'; delete from marts.dim_customers where '1'='1"}, "as_of"),
        ({"promotion_policy": "auto; grant all on schema raw to public"}, "promotion_policy"),
        ({"min_support": "0.1; drop schema ml cascade"}, "min_support"),
        ({"k_max": "8 union select 1"}, "k_max"),
    ],
)
def test_sql_looking_strings_are_rejected(raw, name):
    message = _problems(raw)
    assert f"{name}:" in message
    assert "looks like SQL" in message


def test_unknown_keys_are_rejected_so_typos_do_not_run_with_defaults():
    message = _problems({"min_suport": 0.5})
    assert "unknown parameter 'min_suport'" in message


def test_booleans_are_not_numbers_and_numbers_not_booleans():
    assert "k_min" in _problems({"k_min": True})
    assert "full_refresh" in _problems({"full_refresh": 1})


def test_as_of_must_be_a_real_date():
    assert "not a real calendar date" in _problems({"as_of": "2025-02-30"})
    assert "YYYY-MM-DD" in _problems({"as_of": "30/06/2025"})
    assert RunParams.from_mapping({"as_of": ""}).as_of is None
    assert RunParams.from_mapping({"as_of": None}).as_of is None


def test_specs_cover_every_field_with_a_description_and_the_same_default():
    specs = param_specs()
    defaults = RunParams().to_dict()
    assert set(specs) == set(defaults)
    for name, spec in specs.items():
        assert spec["description"].strip(), name
        assert spec["default"] == defaults[name], name
        schema = {k: v for k, v in spec.items() if k not in ("default", "description")}
        jsonschema.validate(spec["default"], schema)


def test_family_and_policy_names_match_the_modules_that_use_them():
    from ml.registry import POLICIES
    from ml.segmentation import FAMILIES

    assert set(SEGMENTATION_FAMILIES) == set(FAMILIES)
    assert set(PROMOTION_POLICIES) == set(POLICIES)


def _schema_ok(name: str, value) -> bool:
    spec = param_specs()[name]
    schema = {k: v for k, v in spec.items() if k not in ("default", "description")}
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return False
    return True


def _python_ok(name: str, value, **others) -> bool:
    try:
        RunParams.from_mapping({name: value, **others})
    except InvalidParams:
        return False
    return True


@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-2, max_value=3))
def test_form_and_python_agree_on_support_bounds(value):
    assert _schema_ok("min_support", value) == _python_ok("min_support", value)


@given(st.integers(min_value=-5, max_value=800))
def test_form_and_python_agree_on_integer_bounds(value):
    # k_max at its largest, so only k_min's own bounds are tested here (not k_min <= k_max).
    assert _schema_ok("k_min", value) == _python_ok("k_min", value, k_max=30)
    for name in ("max_len", "horizon_days"):
        assert _schema_ok(name, value) == _python_ok(name, value), name
