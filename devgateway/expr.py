"""The ``vars`` expressions of APISIX (lua-resty-expr), as far as devgateway evaluates them.

``response-rewrite`` decides with these whether a response is rewritten, so a rule that behaves
differently here than in APISIX would make local runs lie. The comparisons follow lua-resty-expr
exactly, including its sharp edge: variables are strings (``status`` is ``"401"``), ``==`` and
``~=`` convert them to numbers only when the right side is a number, ``>``/``<``/``>=``/``<=``
convert both sides, and ``in`` compares without conversion, so ``["status", "in", [401]]`` never
matches in APISIX and never matches here either (``warnings`` says so at start-up).

Supported: ``[var, op, value]``, ``[var, "!", op, value]``, the old ``[var, value]`` form (``==``),
and nesting under ``"AND"``, ``"OR"``, ``"!AND"``, ``"!OR"``. Operators: ``==``, ``~=``, ``>``,
``<``, ``>=``, ``<=``, ``in``, ``has``. The regex operators (``~~``, ``~*``) use PCRE in APISIX;
they are refused rather than approximated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

COMPARISONS = ("==", "~=", ">", "<", ">=", "<=", "in", "has")
_REGEX_OPS = ("~~", "~*")
_LOGIC = ("AND", "OR", "!AND", "!OR")

Lookup = Callable[[str], str | None]
"""The value of a variable for the current request (``None``: not set)."""


class ExprError(ValueError):
    """A ``vars`` expression APISIX would refuse, or one devgateway does not imitate."""


@dataclass(frozen=True, slots=True)
class Comparison:
    var: str
    op: str
    value: Any
    negate: bool = False


@dataclass(frozen=True, slots=True)
class Group:
    logic: str  # AND, OR, !AND, !OR
    items: tuple[Comparison | Group, ...] = field(default_factory=tuple)


def _number(value: Any) -> float | None:
    """Lua's ``tonumber`` for the values a config or a variable can hold."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lower().lstrip("+-") in ("inf", "infinity", "nan"):
            return None  # Lua's tonumber knows no such words
        try:
            return float(int(text, 16)) if text.lower().startswith("0x") else float(text)
        except ValueError:
            return None
    return None


def _lua_equal(left: Any, right: Any) -> bool:
    """Lua's ``==``: values of different types are never equal."""
    if isinstance(left, bool) or isinstance(right, bool):
        return left is right
    if isinstance(left, int | float) and isinstance(right, int | float):
        return float(left) == float(right)
    return type(left) is type(right) and bool(left == right)


def _compare(op: str, left: str | None, right: Any) -> bool:
    if op in ("==", "~="):
        if isinstance(right, int | float) and not isinstance(right, bool):
            number = _number(left)
            if number is None:
                return op == "~="
            return (number == right) == (op == "==")
        return _lua_equal(left, right) == (op == "==")
    if op in (">", "<", ">=", "<="):
        lnum, rnum = _number(left), _number(right)
        if lnum is None or rnum is None:
            return False
        return {
            ">": lnum > rnum,
            "<": lnum < rnum,
            ">=": lnum >= rnum,
            "<=": lnum <= rnum,
        }[op]
    if op == "in":
        return isinstance(right, list) and any(_lua_equal(item, left) for item in right)
    # "has": the variable would have to be an array; request variables never are.
    return False


def _compile_comparison(rule: list[Any]) -> Comparison:
    negate = False
    if len(rule) == 4:
        if rule[1] != "!":
            raise ExprError("bad 'not' expression: the second item must be '!'")
        negate = True
        var, op, value = rule[0], rule[2], rule[3]
    elif len(rule) == 3:
        var, op, value = rule
    elif len(rule) == 2:
        var, op, value = rule[0], "==", rule[1]  # the old two-item form
    else:
        raise ExprError(f"invalid expression {rule!r}")
    if not isinstance(var, str) or not isinstance(op, str):
        raise ExprError(f"invalid expression {rule!r}")
    op = op.lower()
    if op in _REGEX_OPS:
        raise ExprError(
            f"operator {op!r} (a PCRE regular expression in APISIX) is not imitated by devgateway"
        )
    if op not in COMPARISONS:
        raise ExprError(f"invalid operator {op!r}")
    if value is None:
        raise ExprError(f"invalid expression {rule!r}")
    return Comparison(var=var, op=op, value=value, negate=negate)


def _compile(rule: Any) -> Comparison | Group:
    if not isinstance(rule, list) or not rule:
        raise ExprError("rule too short")
    if isinstance(rule[0], list):
        return Group("AND", tuple(_compile(item) for item in rule))
    if isinstance(rule[0], str) and rule[0].upper() in _LOGIC:
        if len(rule) <= 2:
            raise ExprError("rule too short")
        return Group(rule[0].upper(), tuple(_compile(item) for item in rule[1:]))
    return _compile_comparison(rule)


def compile_vars(rules: list[Any]) -> Group | None:
    """The compiled form of a ``vars`` array; ``None`` (always true) for an empty one."""
    if not rules:
        return None
    if not isinstance(rules[0], list) and not (
        isinstance(rules[0], str) and rules[0].upper() in _LOGIC
    ):
        raise ExprError("rule should be wrapped inside brackets")
    compiled = _compile(rules)
    return compiled if isinstance(compiled, Group) else Group("AND", (compiled,))


def evaluate(expr: Group | None, lookup: Lookup) -> bool:
    if expr is None:
        return True
    results = (
        evaluate(item, lookup)
        if isinstance(item, Group)
        else _compare(item.op, lookup(item.var), item.value) != item.negate
        for item in expr.items
    )
    outcome = all(results) if expr.logic in ("AND", "!AND") else any(results)
    return outcome if not expr.logic.startswith("!") else not outcome


def variables(expr: Group | None) -> list[str]:
    """Every variable an expression reads."""
    if expr is None:
        return []
    names: list[str] = []
    for item in expr.items:
        names.extend(variables(item) if isinstance(item, Group) else [item.var])
    return names


def warnings(expr: Group | None) -> list[str]:
    """Rules that are valid but can never be true in APISIX (and so never here)."""
    found: list[str] = []
    if expr is None:
        return found
    for item in expr.items:
        if isinstance(item, Group):
            found.extend(warnings(item))
        elif (
            item.op == "in"
            and isinstance(item.value, list)
            and any(isinstance(v, int | float) and not isinstance(v, bool) for v in item.value)
        ):
            found.append(
                f"[{item.var}, in, {item.value}] compares the string value of {item.var} "
                "with numbers, which APISIX never finds equal; write the values as strings"
            )
    return found
