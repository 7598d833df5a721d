"""Tests for federation.filters: parsing, formatting, limits and error messages."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from federation.errors import InvalidRequestError
from federation.filters import (
    MAX_FILTER_CHARS,
    MAX_FILTER_DEPTH,
    MAX_FILTER_NODES,
    filter_columns,
    format_filter,
    parse_filter,
)
from federation.queries import All, Any, Comparison, Filter, FilterValue, Not, Operator

A = Comparison("a", Operator.GT, (1.0,))
B = Comparison("b", Operator.LT, (2.0,))
C = Comparison("c", Operator.EQ, ("x",))


def _typed(expr: Filter) -> object:
    """A structural view that also compares value types (True == 1.0 in Python)."""
    if isinstance(expr, Comparison):
        return (expr.column, expr.op, tuple((type(v), v) for v in expr.values))
    if isinstance(expr, Not):
        return ("not", _typed(expr.item))
    return (type(expr).__name__, tuple(_typed(item) for item in expr.items))


def _error(text: str) -> str:
    with pytest.raises(InvalidRequestError) as info:
        parse_filter(text)
    return str(info.value)


# ------------------------------------------------------------------ grammar


def test_single_comparison_is_not_wrapped() -> None:
    assert parse_filter("a > 1") == A
    assert parse_filter("((a > 1))") == A


@pytest.mark.parametrize(
    ("text", "op"),
    [
        ("a == 1", Operator.EQ),
        ("a = 1", Operator.EQ),
        ("a != 1", Operator.NE),
        ("a < 1", Operator.LT),
        ("a <= 1", Operator.LE),
        ("a > 1", Operator.GT),
        ("a >= 1", Operator.GE),
        ("a>=1", Operator.GE),
    ],
)
def test_operators(text: str, op: Operator) -> None:
    assert parse_filter(text) == Comparison("a", op, (1.0,))


def test_and_binds_tighter_than_or() -> None:
    assert parse_filter("a > 1 or b < 2 and c == 'x'") == Any((A, All((B, C))))
    assert parse_filter("a > 1 and b < 2 or c == 'x'") == Any((All((A, B)), C))


def test_not_binds_tighter_than_and() -> None:
    assert parse_filter("not a > 1 and b < 2") == All((Not(A), B))
    assert parse_filter("not a > 1 or b < 2") == Any((Not(A), B))
    assert parse_filter("not not a > 1") == Not(Not(A))


def test_parentheses_override_precedence() -> None:
    assert parse_filter("(a > 1 or b < 2) and c == 'x'") == All((Any((A, B)), C))
    assert parse_filter("not (a > 1 and b < 2)") == Not(All((A, B)))


def test_runs_are_flattened_but_parentheses_keep_their_group() -> None:
    assert parse_filter("a > 1 and b < 2 and c == 'x'") == All((A, B, C))
    assert parse_filter("a > 1 or b < 2 or c == 'x'") == Any((A, B, C))
    assert parse_filter("(a > 1 and b < 2) and c == 'x'") == All((All((A, B)), C))


def test_in_and_not_in() -> None:
    expected = Comparison("h", Operator.IN, ("rent", "public"))
    assert parse_filter("h in ('rent', \"public\")") == expected
    assert parse_filter("h not in ('rent', 'public')") == Not(expected)
    assert parse_filter("not h in ('rent', 'public')") == Not(expected)
    assert parse_filter("h in (1)") == Comparison("h", Operator.IN, (1.0,))


def test_keywords_are_case_insensitive_and_columns_are_not() -> None:
    expr = parse_filter("Age > 1 AND flag == TRUE Or NOT x In (False) aNd y NOT IN (1)")
    assert expr == Any(
        (
            All((Comparison("Age", Operator.GT, (1.0,)), Comparison("flag", Operator.EQ, (True,)))),
            All(
                (
                    Not(Comparison("x", Operator.IN, (False,))),
                    Not(Comparison("y", Operator.IN, (1.0,))),
                )
            ),
        )
    )


@pytest.mark.parametrize(
    ("literal", "value"),
    [
        ("5", 5.0),
        ("-5", -5.0),
        ("+2.5", 2.5),
        ("0.25", 0.25),
        (".5", 0.5),
        ("5.", 5.0),
        ("1e5", 100000.0),
        ("-1.5E-3", -0.0015),
    ],
)
def test_numbers_are_floats(literal: str, value: float) -> None:
    expr = parse_filter(f"x == {literal}")
    assert isinstance(expr, Comparison)
    assert expr.values == (value,)
    assert type(expr.values[0]) is float


def test_booleans_are_bools() -> None:
    expr = parse_filter("x in (true, FALSE)")
    assert isinstance(expr, Comparison)
    assert [type(v) for v in expr.values] == [bool, bool]
    assert expr.values == (True, False)


@pytest.mark.parametrize(
    ("literal", "value"),
    [
        ("'plain'", "plain"),
        ('"dq"', "dq"),
        ("'it\\'s'", "it's"),
        ('"say \\"hi\\""', 'say "hi"'),
        ("'a\\\\b'", "a\\b"),
        ("'tab\\there\\n'", "tab\there\n"),
        ("'\\u00e9\\U0001F600'", "\u00e9\U0001f600"),
        ("'caf\u00e9'", "caf\u00e9"),
        ("''", ""),
        ("'a and b or (c)'", "a and b or (c)"),
    ],
)
def test_strings_and_escapes(literal: str, value: str) -> None:
    assert parse_filter(f"x == {literal}") == Comparison("x", Operator.EQ, (value,))


def test_filter_columns() -> None:
    expr = parse_filter("a > 1 or not (b == 'x' and a < 5) or c not in (1, 2)")
    assert filter_columns(expr) == frozenset({"a", "b", "c"})
    assert filter_columns(A) == frozenset({"a"})


# ------------------------------------------------------------------ formatting


def test_format_examples() -> None:
    assert format_filter(A) == "a > 1.0"
    assert format_filter(All((Any((A, B)), C))) == '(a > 1.0 or b < 2.0) and c == "x"'
    assert format_filter(Not(All((A, B)))) == "not (a > 1.0 and b < 2.0)"
    assert format_filter(Not(Comparison("h", Operator.IN, ("x", True)))) == 'h not in ("x", true)'
    assert (
        format_filter(Comparison("s", Operator.EQ, ('q"\\\n\x00',))) == 's == "q\\"\\\\\\n\\u0000"'
    )


def test_format_keeps_nested_groups_apart() -> None:
    for expr in (All((All((A, B)), C)), Any((Any((A, B)), C)), Any((A, All((B, C))))):
        assert parse_filter(format_filter(expr)) == expr


def test_format_unwraps_single_item_groups() -> None:
    assert format_filter(All((A,))) == "a > 1.0"
    assert parse_filter(format_filter(All((Any((A,)), B)))) == All((A, B))
    assert parse_filter(format_filter(Not(All((Any((A, B)),))))) == Not(Any((A, B)))


@pytest.mark.parametrize(
    "expr",
    [
        All(()),
        Not(Any(())),
        Comparison("and", Operator.EQ, (1.0,)),
        Comparison("1st", Operator.EQ, (1.0,)),
        Comparison("a-b", Operator.EQ, (1.0,)),
    ],
)
def test_format_rejects_trees_without_text(expr: Filter) -> None:
    with pytest.raises(InvalidRequestError):
        format_filter(expr)


def test_format_rejects_trees_over_the_limits() -> None:
    deep: Filter = A
    for _ in range(MAX_FILTER_DEPTH):
        deep = Not(deep)
    with pytest.raises(InvalidRequestError, match="levels deep"):
        format_filter(deep)
    wide = Any(tuple(Comparison(f"c{i}", Operator.EQ, (1.0,)) for i in range(MAX_FILTER_NODES)))
    with pytest.raises(InvalidRequestError, match="nodes"):
        format_filter(wide)


_KEYWORDS = {"and", "or", "not", "in", "true", "false"}
_columns = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True).filter(
    lambda name: name.lower() not in _KEYWORDS
)
_values: st.SearchStrategy[FilterValue] = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.booleans(),
)
_single_ops = st.sampled_from([op for op in Operator if op is not Operator.IN])
_comparisons = st.one_of(
    st.builds(lambda c, op, v: Comparison(c, op, (v,)), _columns, _single_ops, _values),
    st.builds(
        lambda c, vs: Comparison(c, Operator.IN, tuple(vs)),
        _columns,
        st.lists(_values, min_size=1, max_size=4),
    ),
)


def _groups(children: st.SearchStrategy[Filter]) -> st.SearchStrategy[Filter]:
    items = st.lists(children, min_size=2, max_size=4).map(tuple)
    return st.one_of(children.map(Not), items.map(All), items.map(Any))


_trees: st.SearchStrategy[Filter] = st.recursive(_comparisons, _groups, max_leaves=12)


@settings(max_examples=300)
@given(_trees)
def test_format_then_parse_round_trips(expr: Filter) -> None:
    text = format_filter(expr)
    parsed = parse_filter(text)
    assert parsed == expr
    assert _typed(parsed) == _typed(expr)
    assert format_filter(parsed) == text


@given(st.text(max_size=60))
def test_arbitrary_text_parses_or_raises_invalid_request(text: str) -> None:
    try:
        expr = parse_filter(text)
    except InvalidRequestError as err:
        message = str(err)
    else:
        assert parse_filter(format_filter(expr)) == expr
        return
    assert message.startswith("filter")


# ------------------------------------------------------------------ errors


def test_error_names_position_and_what_was_expected() -> None:
    assert _error("income >= ") == (
        "filter: expected a value after '>=' at position 9 in \"income >= \""
    )


@pytest.mark.parametrize(
    ("text", "position", "fragment"),
    [
        ("a > 1 and (b < 2", 10, "unbalanced '('"),
        ("(a > 1", 0, "add the matching ')'"),
        ("a > 1)", 5, "unbalanced ')'"),
        ("a > 1 and b < 2)", 15, "no '(' is open here"),
        ("(a > 1 b < 2)", 7, "expected ')', 'and' or 'or'"),
        ("a => 3", 2, "unknown operator '=>'"),
        ("a <> 3", 2, "use one of ==, !=, <, <=, >, >=, in or not in"),
        ("a 3", 2, "expected an operator after column 'a'"),
        ("a", 1, "expected an operator after column 'a'"),
        ("a >", 3, "expected a value after '>'"),
        ("a > and b < 1", 4, "expected a value after '>', got 'and'"),
        ("a > rent", 4, "quote strings, e.g. 'rent'"),
        ("a in ()", 6, "expected a value after '('"),
        ("a in (1,", 8, "expected a value after ','"),
        ("a in (1 2)", 8, "expected ',' or ')'"),
        ("a in 1", 5, "expected '(' to start the list"),
        ("a not 1", 6, "expected 'in' after 'not'"),
        ("a > 1 b", 6, "unexpected name 'b'"),
        ("a > 1 2", 6, "unexpected number '2'"),
        ("a > 1 and", 9, "expected a column name, 'not' or '('"),
        ("and a > 1", 0, "expected a column name, 'not' or '(', got 'and'"),
        ("5 > a", 0, "expected a column name"),
        ("a == 'x", 5, "unterminated string"),
        ('a == "x\\"', 5, "unterminated string"),
        ("a == 'x\\", 7, "unterminated string"),
        ("a == '\\q'", 6, "unknown escape '\\q'"),
        ("a == '\\u12'", 6, "unknown escape '\\u'"),
        ("a == '\\ud800'", 6, "not a valid character"),
        ("a == nan", 5, "non-finite number 'nan'"),
        ("a == NaN", 5, "non-finite number 'NaN'"),
        ("a == inf", 5, "non-finite number 'inf'"),
        ("a == -inf", 5, "non-finite number '-inf'"),
        ("a in (1, +Infinity)", 9, "values must be finite"),
        ("a == 1e999", 5, "too large"),
        ("a == 1.2.3", 5, "malformed number"),
        ("a == 1e", 5, "malformed number"),
        ("a == -", 5, "expected a number"),
        ("a > 1 && b < 2", 6, "use 'and'"),
        ("a > 1 || b < 2", 6, "use 'or'"),
        ("a > 1 # note", 6, "unexpected character '#'"),
    ],
)
def test_error_paths(text: str, position: int, fragment: str) -> None:
    message = _error(text)
    assert message.startswith("filter: ")
    assert fragment in message
    assert f"at position {position} " in message
    assert text.replace("\n", " ") in message


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_filter(text: str) -> None:
    assert "filter is empty" in _error(text)


def test_too_long() -> None:
    text = " or ".join(["a > 1"] * 1000)
    assert len(text) > MAX_FILTER_CHARS
    message = _error(text)
    assert f"{len(text)} characters" in message
    assert str(MAX_FILTER_CHARS) in message
    parse_filter("a == '" + "x" * (MAX_FILTER_CHARS - 7) + "'")  # exactly at the limit


def test_too_many_nodes() -> None:
    text = " or ".join(f"c{i} > 1" for i in range(MAX_FILTER_NODES))
    assert len(text) <= MAX_FILTER_CHARS
    message = _error(text)
    assert f"more than {MAX_FILTER_NODES} conditions" in message
    parse_filter(" or ".join(f"c{i} > 1" for i in range(MAX_FILTER_NODES - 1)))


def test_too_deep_by_parentheses() -> None:
    depth = MAX_FILTER_DEPTH + 1
    message = _error("(" * depth + "a > 1" + ")" * depth)
    assert f"nested more than {MAX_FILTER_DEPTH} levels" in message
    assert "at position 32 " in message
    parse_filter("(" * MAX_FILTER_DEPTH + "a > 1" + ")" * MAX_FILTER_DEPTH)


def test_too_deep_by_not() -> None:
    assert "levels deep" in _error("not " * (MAX_FILTER_DEPTH + 1) + "a > 1")
    assert "levels deep" in _error("not " * 1000 + "a > 1")  # no RecursionError
    assert "levels deep" in _error("(" * 2000 + "a > 1" + ")" * 2000)


def test_too_deep_by_alternating_groups() -> None:
    # 'c1 > 1 or (c0 > 1 and (z > 1))': the tree is one level deeper than the parentheses.
    def nest(levels: int) -> str:
        text = "z > 1"
        for i in range(levels):
            joiner = " or " if i % 2 else " and "
            text = f"c{i} > 1{joiner}({text})"
        return text

    assert "levels deep" in _error(nest(MAX_FILTER_DEPTH))
    parse_filter(nest(MAX_FILTER_DEPTH - 2))


def test_long_text_is_shown_as_an_excerpt() -> None:
    text = " and ".join(f"column_{i} > {i}" for i in range(40)) + " and oops"
    message = _error(text)
    assert re.search(r'near "\.\.\..*oops"', message)
    assert len(message) < 300


def test_parse_rejects_non_strings() -> None:
    with pytest.raises(InvalidRequestError, match="must be a string"):
        parse_filter(42)  # type: ignore[arg-type]
