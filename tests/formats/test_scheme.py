"""QuantScheme: the short-name grammar, round trips, and rejection of inconsistent options."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgequant.errors import EdgequantError, SchemeError
from edgequant.formats import QuantScheme
from edgequant.formats.scheme import EXAMPLES, FORMATS, SCALE_DTYPES

# hand-written expectations for the documented names (the grammar in scheme.py's docstring)
EXPECTED = {
    "w4g128": dict(bits=4, format="int", symmetric=True, granularity="group", group_size=128),
    "w3g128-asym": dict(bits=3, symmetric=False, granularity="group", group_size=128),
    "w8": dict(bits=8, format="int", granularity="channel", group_size=None),
    "w8-tensor": dict(bits=8, granularity="tensor", group_size=None),
    "w8a8": dict(bits=8, granularity="channel", act_bits=8, act_dynamic=True),
    "w4g64-bf16": dict(bits=4, group_size=64, scale_dtype="bfloat16"),
    "w4g64-asym-fz": dict(bits=4, format="int", symmetric=False, group_size=64, float_zero=True),
    "nf4": dict(bits=4, format="nf4", granularity="group", group_size=64, double_quant=False,
                scale_dtype="float32"),  # bitsandbytes keeps absmax in fp32
    "nf4-dq": dict(format="nf4", group_size=64, double_quant=True, scale_dtype="float32"),
    "fp4": dict(format="fp4", granularity="group", group_size=64, scale_dtype="float32"),
    "fp4_e2m1g32": dict(format="fp4_e2m1", granularity="group", group_size=32),
    "fp8": dict(bits=8, format="fp8_e4m3", granularity="channel", group_size=None),
    "fp8_e5m2": dict(bits=8, format="fp8_e5m2", granularity="channel"),
    "binary": dict(bits=1, format="binary", granularity="channel"),
    "ternaryg64": dict(bits=2, format="ternary", granularity="group", group_size=64),
}


def test_every_example_is_described_here():
    assert set(EXAMPLES) == set(EXPECTED)


@pytest.mark.parametrize("text", EXAMPLES)
def test_examples_parse_to_the_documented_scheme(text):
    s = QuantScheme.parse(text)
    for field, value in EXPECTED[text].items():
        assert getattr(s, field) == value, (text, field)
    if "scale_dtype" not in EXPECTED[text]:
        assert s.scale_dtype == "float16"


@pytest.mark.parametrize("text", EXAMPLES)
def test_examples_round_trip(text):
    s = QuantScheme.parse(text)
    assert QuantScheme.parse(s.name) == s
    assert QuantScheme.from_dict(s.to_dict()) == s
    assert QuantScheme.parse(s) is s


def test_parse_is_case_and_space_insensitive():
    assert QuantScheme.parse("  W4G128-ASYM ") == QuantScheme.parse("w4g128-asym")


@st.composite
def schemes(draw) -> QuantScheme:
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    fixed_bits = FORMATS[fmt][0]
    bits = draw(st.integers(2, 8)) if fixed_bits is None else fixed_bits
    gran = draw(st.sampled_from(["tensor", "channel", "group"]))
    group = draw(st.integers(1, 4096)) if gran == "group" else None
    return QuantScheme(
        bits=bits, format=fmt, granularity=gran, group_size=group,
        symmetric=draw(st.booleans()) if fmt == "int" else True,
        scale_dtype=("float32" if fmt in ("nf4", "fp4")
                     else draw(st.sampled_from(SCALE_DTYPES))),
        double_quant=draw(st.booleans()) if fmt in ("nf4", "fp4") else False,
        act_bits=draw(st.sampled_from([None, 8])) if fmt == "int" else None,
        act_dynamic=draw(st.booleans()),
    )


@settings(max_examples=150, deadline=None)
@given(schemes())
def test_generated_schemes_round_trip_through_their_name(s):
    assert QuantScheme.parse(s.name) == s
    assert QuantScheme.from_dict(s.to_dict()) == s


@pytest.mark.parametrize("text", ["w4x", "q4_k_m", "int4", "", "w4g128-foo", "nf5", "w4g"])
def test_unknown_names_list_the_valid_examples(text):
    with pytest.raises(SchemeError) as e:
        QuantScheme.parse(text)
    msg = str(e.value)
    assert repr(text.strip().lower()) in msg or text in msg
    for example in EXAMPLES:
        assert example in msg


def test_scheme_errors_are_user_errors():
    with pytest.raises(EdgequantError):
        QuantScheme.parse("nonsense")
    with pytest.raises(ValueError):
        QuantScheme.parse("nonsense")


@pytest.mark.parametrize("text", [
    "w9", "w1", "w4a4", "w4g0", "nf4-asym", "fp8-asym", "binary-asym", "w4-dq", "fp8-dq",
    "w4g128-tensor",
])
def test_inconsistent_names_are_rejected(text):
    with pytest.raises(SchemeError):
        QuantScheme.parse(text)


@pytest.mark.parametrize("kwargs", [
    dict(format="nf4", bits=3),
    dict(format="fp8_e4m3", bits=4, granularity="channel", group_size=None),
    dict(format="int", bits=9),
    dict(format="mxfp9"),
    dict(granularity="group", group_size=None),
    dict(granularity="group", group_size=-4),
    dict(granularity="channel", group_size=64),
    dict(granularity="row", group_size=None),
    dict(scale_dtype="float64"),
    dict(format="int", double_quant=True),
    dict(act_bits=4),
])
def test_inconsistent_options_are_rejected(kwargs):
    with pytest.raises(SchemeError):
        QuantScheme(**kwargs)


def test_from_dict_rejects_other_versions_and_unknown_fields():
    d = QuantScheme.parse("w4g128").to_dict()
    with pytest.raises(SchemeError, match="version"):
        QuantScheme.from_dict({**d, "version": d["version"] + 1})
    with pytest.raises(SchemeError, match="colour"):
        QuantScheme.from_dict({**d, "colour": "red"})
