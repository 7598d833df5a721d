"""Filter expressions as text: parse them into the ``queries`` filter tree and back.

The grammar (keywords are case-insensitive, column names are not)::

    expr := or
    or   := and ('or' and)*
    and  := not ('and' not)*
    not  := 'not' not | atom
    atom := '(' expr ')'
          | IDENT op literal                          op: == = != < <= > >=
          | IDENT 'in' '(' literal (',' literal)* ')'
          | IDENT 'not' 'in' '(' literal (',' literal)* ')'   -> Not(Comparison IN)

Literals are numbers (stored as float; finite only), single- or double-quoted strings with
backslash escapes, and ``true`` / ``false``. A run of ``and`` (or ``or``) becomes one
``All`` (``Any``); parentheses keep their grouping, so every tree ``format_filter`` writes
parses back to an equal tree.

The text comes from users, so it is read by a hand-written tokenizer and recursive-descent
parser (never ``eval``) whose size, node count and nesting are bounded before any work.

>>> expr = parse_filter("age >= 30 and housing not in ('rent', 'public')")
>>> type(expr).__name__, [type(item).__name__ for item in expr.items]
('All', ['Comparison', 'Not'])
>>> format_filter(parse_filter("AGE < 30 OR income>=1e5 and flag = TRUE"))
'AGE < 30.0 or income >= 100000.0 and flag == true'
"""

from __future__ import annotations

import enum
import math
import re
import string
from dataclasses import dataclass
from typing import NoReturn

from federation.errors import InvalidRequestError
from federation.queries import All, Any, Comparison, Filter, FilterValue, Not, Operator

__all__ = [
    "MAX_FILTER_CHARS",
    "MAX_FILTER_DEPTH",
    "MAX_FILTER_NODES",
    "filter_columns",
    "format_filter",
    "parse_filter",
]

MAX_FILTER_CHARS = 4096
MAX_FILTER_NODES = 256
MAX_FILTER_DEPTH = 32

_KEYWORDS = frozenset({"and", "or", "not", "in", "true", "false"})
_NON_FINITE = frozenset({"nan", "inf", "infinity"})
_OPERATORS: dict[str, Operator] = {
    "==": Operator.EQ,
    "=": Operator.EQ,
    "!=": Operator.NE,
    "<": Operator.LT,
    "<=": Operator.LE,
    ">": Operator.GT,
    ">=": Operator.GE,
}
_OPERATOR_CHARS = frozenset("<>=!")
_OPERATOR_HELP = "==, !=, <, <=, >, >=, in or not in"
_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t", "r": "\r", "0": "\0"}
_HINTS = {"&": "use 'and'", "|": "use 'or'", "`": "quote string values with ' or \""}
_EXCERPT_CHARS = 80


class _Kind(enum.Enum):
    IDENT = "name"
    KEYWORD = "keyword"
    OP = "operator"
    NUMBER = "number"
    STRING = "string"
    LPAREN = "'('"
    RPAREN = "')'"
    COMMA = "','"
    END = "the end of the filter"


@dataclass(frozen=True, slots=True)
class _Token:
    kind: _Kind
    text: str  # the source text (keywords lower-cased)
    start: int
    end: int
    value: FilterValue | None = None


def parse_filter(text: str) -> Filter:
    """Parse a filter expression into a ``queries.Filter`` tree.

    Args:
        text: the expression, e.g. ``"age >= 30 and employment in ('employed', 'retired')"``.

    Returns:
        The tree; a single comparison is returned bare, never wrapped in ``All``.

    Raises:
        InvalidRequestError: the text is malformed or over a limit (``MAX_FILTER_CHARS``,
            ``MAX_FILTER_NODES``, ``MAX_FILTER_DEPTH``). The message gives the 0-based
            character position of the problem and what was expected there.
    """
    if not isinstance(text, str):
        raise InvalidRequestError(f"filter must be a string; got {type(text).__name__}")
    if len(text) > MAX_FILTER_CHARS:
        raise InvalidRequestError(
            f"filter is {len(text)} characters long; the limit is {MAX_FILTER_CHARS}. "
            "Shorten it, e.g. by grouping values with 'in (...)'"
        )
    if not text.strip():
        raise InvalidRequestError('filter is empty; write e.g. "age >= 30" or leave it out')
    return _Parser(text).parse()


def format_filter(expr: Filter) -> str:
    """Write a filter tree as text that ``parse_filter`` reads back to an equal tree.

    ``All``/``Any`` with one item are written as that item, which is the only case where the
    round trip normalises instead of reproducing the tree. The round trip also needs the
    text to fit in ``MAX_FILTER_CHARS``; this function does not shorten it.

    Args:
        expr: the tree.

    Returns:
        The expression; numbers are written as Python float literals, strings double-quoted.

    Raises:
        InvalidRequestError: the tree is over ``MAX_FILTER_NODES`` or ``MAX_FILTER_DEPTH``,
            has an empty ``All``/``Any`` (no text means "always"/"never"), holds something
            that is not a filter node, or names a column that is not an identifier.
    """
    _check_tree(expr)
    return _format(expr)


def filter_columns(expr: Filter) -> frozenset[str]:
    """Return the names of every column the filter reads.

    >>> sorted(filter_columns(parse_filter("a > 1 or not (b == 'x' and a < 5)")))
    ['a', 'b']
    """
    columns: set[str] = set()
    stack: list[Filter] = [expr]
    while stack:
        node = stack.pop()
        if isinstance(node, Comparison):
            columns.add(node.column)
        elif isinstance(node, Not):
            stack.append(node.item)
        else:
            stack.extend(node.items)
    return frozenset(columns)


# Tokenizer

# ASCII digits only: float() would accept other scripts' digits, which nobody means here.
_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_WORD = re.compile(r"[^\W\d]\w*")
_SIGNED_WORD = re.compile(r"[+-]?([^\W\d]\w*)")
_SINGLE = {"(": _Kind.LPAREN, ")": _Kind.RPAREN, ",": _Kind.COMMA}


def _tokenize(text: str) -> list[_Token]:
    """Split ``text`` into tokens, ending with an END token."""
    tokens: list[_Token] = []
    pos = 0
    while pos < len(text):
        ch = text[pos]
        if ch.isspace():
            pos += 1
            continue
        if ch in _SINGLE:
            token = _Token(_SINGLE[ch], ch, pos, pos + 1)
        elif ch in _OPERATOR_CHARS:
            token = _read_operator(text, pos)
        elif ch in "'\"":
            token = _read_string(text, pos)
        elif ch in "+-." or ch.isdecimal():
            token = _read_number(text, pos)
        elif match := _WORD.match(text, pos):
            word = match.group()
            kind = _Kind.KEYWORD if word.lower() in _KEYWORDS else _Kind.IDENT
            token = _Token(kind, word.lower() if kind is _Kind.KEYWORD else word, pos, match.end())
        else:
            hint = _HINTS.get(ch, "expected a column name, operator, value or parenthesis")
            _fail(text, pos, f"unexpected character {ch!r}", hint=hint)
        tokens.append(token)
        pos = token.end
    end = len(text.rstrip())
    tokens.append(_Token(_Kind.END, "", end, end))
    return tokens


def _read_operator(text: str, start: int) -> _Token:
    end = start
    while end < len(text) and text[end] in _OPERATOR_CHARS:
        end += 1
    op = text[start:end]
    if op not in _OPERATORS:
        _fail(text, start, f"unknown operator {op!r}", hint=f"use one of {_OPERATOR_HELP}")
    return _Token(_Kind.OP, op, start, end)


def _read_number(text: str, start: int) -> _Token:
    """Read a decimal or scientific number (optionally signed) as a float."""
    word = _SIGNED_WORD.match(text, start)
    if word and word.group(1).lower() in _NON_FINITE:
        _fail(text, start, f"non-finite number {word.group()!r}", hint="values must be finite")
    match = _NUMBER.match(text, start)
    if match is None:
        _fail(text, start, f"expected a number at {text[start]!r}")
    end = match.end()
    if end < len(text) and (text[end].isalnum() or text[end] in "_."):
        _fail(text, start, f"malformed number {text[start : end + 1]!r}")
    value = float(match.group())
    if not math.isfinite(value):
        _fail(text, start, f"number {match.group()} is too large", hint="values must be finite")
    return _Token(_Kind.NUMBER, match.group(), start, end, value)


def _read_string(text: str, start: int) -> _Token:
    quote = text[start]
    pos = start + 1
    out: list[str] = []
    while pos < len(text):
        ch = text[pos]
        if ch == quote:
            return _Token(_Kind.STRING, text[start : pos + 1], start, pos + 1, "".join(out))
        if ch == "\\":
            ch, pos = _read_escape(text, pos)
        else:
            pos += 1
        out.append(ch)
    _fail(text, start, "unterminated string", hint=f"add the closing {quote}")


def _read_escape(text: str, pos: int) -> tuple[str, int]:
    """Decode the backslash escape at ``pos``; return it and the position after it."""
    code = text[pos + 1 : pos + 2]
    if not code:
        _fail(text, pos, "unterminated string (it ends in a backslash)")
    if code in _ESCAPES:
        return _ESCAPES[code], pos + 2
    width = {"u": 4, "U": 8}.get(code, 0)
    digits = text[pos + 2 : pos + 2 + width]
    if not width or len(digits) != width or not all(c in string.hexdigits for c in digits):
        _fail(
            text,
            pos,
            f"unknown escape '\\{code}' in a string",
            hint="use \\\\, \\\", \\', \\n, \\t, \\r, \\0, \\uXXXX or \\UXXXXXXXX",
        )
    point = int(digits, 16)
    if point > 0x10FFFF or 0xD800 <= point <= 0xDFFF:
        _fail(text, pos, f"escape '\\{code}{digits}' is not a valid character")
    return chr(point), pos + 2 + width


# ---------------------------------------------------------------------------------------------
# Parser


class _Parser:
    """Recursive descent over the token list; tracks node count and nesting as it builds."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._tokens = _tokenize(text)
        self._index = 0
        self._nodes = 0
        self._nesting = 0

    def parse(self) -> Filter:
        expr, _ = self._or()
        token = self._peek()
        if token.kind is _Kind.RPAREN:
            self._fail(token, "unbalanced ')'", hint="no '(' is open here; remove it")
        if token.kind is not _Kind.END:
            self._fail(
                token,
                f"unexpected {_show(token)}",
                hint="expected 'and', 'or' or the end of the filter",
            )
        return expr

    # Each rule returns (tree, depth of that tree).

    def _or(self) -> tuple[Filter, int]:
        first = self._and()
        items = [first]
        while self._at_keyword("or"):
            self._advance()
            items.append(self._and())
        return self._combine(Any, items)

    def _and(self) -> tuple[Filter, int]:
        items = [self._not()]
        while self._at_keyword("and"):
            self._advance()
            items.append(self._not())
        return self._combine(All, items)

    def _not(self) -> tuple[Filter, int]:
        if not self._at_keyword("not"):
            return self._atom()
        token = self._advance()
        self._enter(token)
        item, depth = self._not()
        self._nesting -= 1
        return self._node(Not(item), depth + 1, token)

    def _atom(self) -> tuple[Filter, int]:
        token = self._peek()
        if token.kind is _Kind.LPAREN:
            self._advance()
            self._enter(token)
            expr = self._or()
            self._nesting -= 1
            closing = self._peek()
            if closing.kind is not _Kind.RPAREN:
                if closing.kind is _Kind.END:
                    self._fail(token, "unbalanced '('", hint="add the matching ')'")
                self._fail(closing, f"expected ')', 'and' or 'or', got {_show(closing)}")
            self._advance()
            return expr
        if token.kind is not _Kind.IDENT:
            self._fail(token, f"expected a column name, 'not' or '(', got {_show(token)}")
        self._advance()
        return self._comparison(token)

    def _comparison(self, column: _Token) -> tuple[Filter, int]:
        token = self._advance()
        if token.kind is _Kind.OP:
            value = self._literal(after=token)
            return self._node(Comparison(column.text, _OPERATORS[token.text], (value,)), 1, column)
        if token.kind is _Kind.KEYWORD and token.text == "in":
            values = self._literal_list(after=token)
            return self._node(Comparison(column.text, Operator.IN, values), 1, column)
        if token.kind is _Kind.KEYWORD and token.text == "not":
            in_token = self._advance()
            if not (in_token.kind is _Kind.KEYWORD and in_token.text == "in"):
                self._fail(in_token, f"expected 'in' after 'not', got {_show(in_token)}")
            values = self._literal_list(after=in_token)
            inner, _ = self._node(Comparison(column.text, Operator.IN, values), 1, column)
            return self._node(Not(inner), 2, column)
        self._fail(
            token,
            f"expected an operator after column {column.text!r}, got {_show(token)}",
            hint=f"use one of {_OPERATOR_HELP}",
        )

    def _literal_list(self, *, after: _Token) -> tuple[FilterValue, ...]:
        token = self._advance()
        if token.kind is not _Kind.LPAREN:
            self._fail(token, f"expected '(' to start the list after 'in', got {_show(token)}")
        values = [self._literal(after=token)]
        while True:
            token = self._advance()
            if token.kind is _Kind.RPAREN:
                return tuple(values)
            if token.kind is not _Kind.COMMA:
                self._fail(token, f"expected ',' or ')' in the 'in' list, got {_show(token)}")
            values.append(self._literal(after=token))

    def _literal(self, *, after: _Token) -> FilterValue:
        token = self._peek()
        if token.kind in (_Kind.NUMBER, _Kind.STRING) and token.value is not None:
            self._advance()
            return token.value
        if token.kind is _Kind.KEYWORD and token.text in ("true", "false"):
            self._advance()
            return token.text == "true"
        if token.kind is _Kind.IDENT and token.text.lower() in _NON_FINITE:
            self._fail(token, f"non-finite number {token.text!r}", hint="values must be finite")
        what = f"expected a value after {_show(after, bare=True)}"
        hint = f"quote strings, e.g. '{token.text}'" if token.kind is _Kind.IDENT else ""
        if token.kind is _Kind.END:
            _fail(self._text, after.end, what)
        self._fail(token, f"{what}, got {_show(token)}", hint=hint)

    # Helpers.

    def _combine(
        self, cls: type[All] | type[Any], items: list[tuple[Filter, int]]
    ) -> tuple[Filter, int]:
        if len(items) == 1:
            return items[0]
        depth = 1 + max(d for _, d in items)
        return self._node(cls(tuple(f for f, _ in items)), depth, self._peek())

    def _node(self, node: Filter, depth: int, token: _Token) -> tuple[Filter, int]:
        self._nodes += 1
        if self._nodes > MAX_FILTER_NODES:
            self._fail(
                token,
                f"more than {MAX_FILTER_NODES} conditions and connectives",
                hint="simplify the filter, e.g. group values with 'in (...)'",
            )
        if depth > MAX_FILTER_DEPTH:
            self._fail(
                token,
                f"nested more than {MAX_FILTER_DEPTH} levels deep",
                hint="flatten the expression",
            )
        return node, depth

    def _enter(self, token: _Token) -> None:
        # Bounds recursion even where redundant parentheses add no tree depth.
        self._nesting += 1
        if self._nesting > MAX_FILTER_DEPTH:
            self._fail(
                token,
                f"nested more than {MAX_FILTER_DEPTH} levels deep (parentheses and 'not')",
                hint="flatten the expression",
            )

    def _peek(self) -> _Token:
        return self._tokens[self._index]

    def _advance(self) -> _Token:
        token = self._tokens[self._index]
        if token.kind is not _Kind.END:
            self._index += 1
        return token

    def _at_keyword(self, word: str) -> bool:
        token = self._peek()
        return token.kind is _Kind.KEYWORD and token.text == word

    def _fail(self, token: _Token, what: str, *, hint: str = "") -> NoReturn:
        _fail(self._text, token.start, what, hint=hint)


def _show(token: _Token, *, bare: bool = False) -> str:
    """Describe a token for an error message (``bare``: just its quoted text)."""
    text = token.text if len(token.text) <= 24 else token.text[:21] + "..."
    if bare:
        return f"'{text}'"
    if token.kind in (_Kind.IDENT, _Kind.OP, _Kind.NUMBER):
        return f"{token.kind.value} '{text}'"
    if token.kind is _Kind.STRING:
        return f"string {text}"
    if token.kind is _Kind.KEYWORD:
        return f"'{text}'"
    return str(token.kind.value)


def _fail(text: str, pos: int, what: str, *, hint: str = "") -> NoReturn:
    """Raise InvalidRequestError naming the position and showing the text around it."""
    flat = "".join(" " if c.isspace() else c for c in text)
    if len(flat) <= _EXCERPT_CHARS:
        shown = f'in "{flat}"'
    else:
        lo = max(0, pos - _EXCERPT_CHARS // 2)
        hi = min(len(flat), lo + _EXCERPT_CHARS)
        prefix = "..." if lo > 0 else ""
        suffix = "..." if hi < len(flat) else ""
        shown = f'near "{prefix}{flat[lo:hi]}{suffix}"'
    tail = f"; {hint}" if hint else ""
    raise InvalidRequestError(f"filter: {what} at position {pos} {shown}{tail}")


# ---------------------------------------------------------------------------------------------
# Formatter


def _check_tree(expr: Filter) -> None:
    """Check that a tree is well formed and within the limits, without recursion."""
    count = 0
    stack: list[tuple[object, int]] = [(expr, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_FILTER_NODES:
            raise InvalidRequestError(f"filter has more than {MAX_FILTER_NODES} nodes")
        if depth > MAX_FILTER_DEPTH:
            raise InvalidRequestError(f"filter is nested more than {MAX_FILTER_DEPTH} levels deep")
        if isinstance(node, Comparison):
            _check_column(node.column)
        elif isinstance(node, Not):
            stack.append((node.item, depth + 1))
        elif isinstance(node, All | Any):
            if not node.items:
                name = type(node).__name__
                raise InvalidRequestError(f"filter has an empty {name}(); it has no text form")
            stack.extend((item, depth + 1) for item in node.items)
        else:
            raise InvalidRequestError(f"filter node must be a filter; got {type(node).__name__}")


def _check_column(name: str) -> None:
    """Check that the tokenizer would read ``name`` back as one column name."""
    if not (isinstance(name, str) and _WORD.fullmatch(name) and name.lower() not in _KEYWORDS):
        raise InvalidRequestError(
            f"filter column {name!r} cannot be written as text: a column in a filter must "
            "start with a letter or '_', hold only letters, digits and '_', and not be a keyword"
        )


def _unwrap(expr: Filter) -> Filter:
    """Strip ``All``/``Any`` wrappers that hold a single item."""
    while isinstance(expr, All | Any) and len(expr.items) == 1:
        expr = expr.items[0]
    return expr


def _format(expr: Filter) -> str:
    expr = _unwrap(expr)
    if isinstance(expr, Comparison):
        return _format_comparison(expr, negate=False)
    if isinstance(expr, Not):
        item = _unwrap(expr.item)
        if isinstance(item, Comparison) and item.op is Operator.IN:
            return _format_comparison(item, negate=True)
        if isinstance(item, All | Any):
            return f"not ({_format(item)})"
        return f"not {_format(item)}"
    joiner = " and " if isinstance(expr, All) else " or "
    return joiner.join(_format_child(item, inside=expr) for item in expr.items)


def _format_child(item: Filter, *, inside: All | Any) -> str:
    """Format an operand of ``and``/``or``, with parentheses where grouping needs them."""
    item = _unwrap(item)
    text = _format(item)
    # 'and' binds tighter than 'or', so only an Any inside an All needs parentheses for
    # precedence; a same-kind child needs them so the parser keeps it a separate node.
    needs = isinstance(item, Any) or (isinstance(inside, All) and isinstance(item, All))
    return f"({text})" if needs else text


def _format_comparison(expr: Comparison, *, negate: bool) -> str:
    values = [_format_value(v) for v in expr.values]
    if expr.op is Operator.IN:
        keyword = "not in" if negate else "in"
        return f"{expr.column} {keyword} ({', '.join(values)})"
    return f"{expr.column} {expr.op.value} {values[0]}"


def _format_value(value: FilterValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        number = float(value)
        if not math.isfinite(number):
            raise InvalidRequestError(f"filter value {number!r} must be finite")
        return repr(number)
    if isinstance(value, str):
        return '"' + "".join(_escape_char(c) for c in value) + '"'
    raise InvalidRequestError(
        f"filter value must be a number, string or bool; got {type(value).__name__}"
    )


def _escape_char(ch: str) -> str:
    if ch in '\\"':
        return "\\" + ch
    if ch == "\n":
        return "\\n"
    if ch == "\t":
        return "\\t"
    if ch == "\r":
        return "\\r"
    if ch.isprintable():
        return ch
    point = ord(ch)
    return f"\\u{point:04x}" if point <= 0xFFFF else f"\\U{point:08x}"
