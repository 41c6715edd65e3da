"""Realistic single bugs injected into Python source, found and applied through `ast`.

Each kind lists the places in a function where that bug could be made; one is chosen and its
source span is replaced by the mutated node's text, so the rest of the code (comments,
formatting) is untouched and the diff is the bug alone. Every mutant parses and differs from
the original as an AST. Places where a change is neutral by construction are left alone:
docstrings, messages (print, logging, warnings, assert and raise) and the order of the arguments
of max, min and the like.
"""

from __future__ import annotations

import ast
import random
import re
from dataclasses import dataclass
from typing import Callable, Iterator

KINDS = ("comparison", "arithmetic", "boolean", "off_by_one", "variable", "condition", "swap_args", "return_value")

_COMPARE_SWAP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
                 ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
_ARITH_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Add, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
               ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult}


@dataclass(frozen=True)
class Mutation:
    kind: str
    buggy: str
    line: int  # 1-based line of the change in the source


_SYMBOL = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=", ast.In: "in",
           ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not", ast.Add: "+", ast.Sub: "-", ast.Mult: "*",
           ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**", ast.And: "and", ast.Or: "or"}


@dataclass(frozen=True)
class _Site:
    kind: str
    node: ast.AST  # where the change is (for its line)
    edit: Callable[[str], str]  # source -> mutated source


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                ids.add(id(first.value))
    return ids


# Bugs that change nothing a caller or a test can see are no bugs to fix: a message's text (what
# print, logging, warnings.warn, an assert or a raised exception shows) and the order of the
# arguments of a function that does not depend on it.
_COMMUTATIVE = {"max", "min", "gcd", "lcm", "hypot"}
_LOG_METHODS = {"debug", "info", "warning", "warn", "error", "exception", "critical", "fatal", "log"}


def _callee(call: ast.Call) -> tuple[str, str]:
    """(receiver, name) of a call: `logger.info(...)` -> ("logger", "info"), `max(...)` -> ("", "max")."""
    func = call.func
    if isinstance(func, ast.Name):
        return "", func.id
    if isinstance(func, ast.Attribute):
        receiver = func.value
        name = receiver.id if isinstance(receiver, ast.Name) else getattr(receiver, "attr", "")
        return name, func.attr
    return "", ""


def _is_message(call: ast.Call) -> bool:
    receiver, name = _callee(call)
    return (name == "print" and not receiver) or (receiver, name) == ("warnings", "warn") or (
        name in _LOG_METHODS and "log" in receiver.lower())  # logger.info, logging.warning; not math.log


def _neutral_nodes(tree: ast.AST) -> set[int]:
    """Every node inside a message (where a mutation changes only the text shown)."""
    roots: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _is_message(node):
            roots.append(node)
        elif isinstance(node, ast.Raise) and node.exc is not None:
            roots.append(node.exc)
        elif isinstance(node, ast.Assert) and node.msg is not None:
            roots.append(node.msg)
    return {id(n) for root in roots for n in ast.walk(root)}


def _scope_names(function: ast.AST) -> list[str]:
    """Parameters and assigned local names of a function, in order of appearance."""
    names: list[str] = []
    args = function.args
    for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
        if arg is not None and arg.arg not in names:
            names.append(arg.arg)
    for node in ast.walk(function):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and node.id not in names:
            names.append(node.id)
    return names


def _negated(expr: ast.expr) -> str:
    if isinstance(expr, ast.UnaryOp) and isinstance(expr.op, ast.Not):
        return ast.unparse(expr.operand)
    return ast.unparse(ast.UnaryOp(op=ast.Not(), operand=expr))


def _sites(function: ast.AST, skip: set[int]) -> Iterator[_Site]:
    scope = _scope_names(function)

    def replace(kind, node, text):
        return _Site(kind, node, lambda src: _splice(src, node, text()))

    def operator(kind, node, left, right, old, new):
        return _Site(kind, node, lambda src: _splice_operator(src, left, right, _SYMBOL[old], _SYMBOL[new]))

    for node in ast.walk(function):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _COMPARE_SWAP:
            op = type(node.ops[0])
            yield operator("comparison", node, node.left, node.comparators[0], op, _COMPARE_SWAP[op])
        elif isinstance(node, ast.BinOp) and type(node.op) in _ARITH_SWAP:
            yield operator("arithmetic", node, node.left, node.right, type(node.op), _ARITH_SWAP[type(node.op)])
        elif isinstance(node, ast.AugAssign) and type(node.op) in _ARITH_SWAP:
            yield operator("arithmetic", node, node.target, node.value, type(node.op), _ARITH_SWAP[type(node.op)])
        elif isinstance(node, ast.BoolOp):
            other = ast.Or if isinstance(node.op, ast.And) else ast.And
            for left, right in zip(node.values, node.values[1:]):
                yield operator("boolean", node, left, right, type(node.op), other)
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            for delta in (1, -1):
                if node.value + delta >= 0:
                    yield replace("off_by_one", node, lambda n=node, d=delta: repr(n.value + d))
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in scope:
            for other in scope:
                if other != node.id:
                    yield replace("variable", node, lambda o=other: o)
        elif isinstance(node, (ast.If, ast.While, ast.IfExp)):
            yield replace("condition", node.test, lambda t=node.test: _negated(t))
            if isinstance(node, ast.If) and not node.orelse:
                yield replace("condition", node, lambda n=node: _dropped_if(n))
        elif isinstance(node, ast.Call) and not node.keywords and _callee(node)[1] not in _COMMUTATIVE:
            positional = [a for a in node.args if not isinstance(a, ast.Starred)]
            if len(positional) == len(node.args) >= 2:
                for i in range(len(node.args) - 1):
                    if ast.dump(node.args[i]) != ast.dump(node.args[i + 1]):
                        yield _Site("swap_args", node, lambda src, n=node, i=i: _swap_spans(src, n.args[i], n.args[i + 1]))
        elif isinstance(node, ast.Return) and node.value is not None:
            value = node.value
            if isinstance(value, (ast.Compare, ast.BoolOp)) or (isinstance(value, ast.UnaryOp) and isinstance(value.op, ast.Not)):
                yield replace("return_value", value, lambda v=value: _negated(v))
            elif isinstance(value, ast.Constant) and isinstance(value.value, bool):
                yield replace("return_value", value, lambda v=value: repr(not v.value))
            elif not (isinstance(value, ast.Constant) and value.value is None):
                yield replace("return_value", value, lambda: "None")


def _dropped_if(node: ast.If) -> str:
    """The body of an `if` without its condition, at the `if`'s own indentation."""
    return "\n".join(ast.unparse(statement) for statement in node.body)


def _offset(lines: list[bytes], line: int, col: int) -> int:
    return sum(len(l) for l in lines[: line - 1]) + col


def _swap_spans(source: str, a: ast.AST, b: ast.AST) -> str:
    """Exchange the source text of two sibling nodes (`a` before `b`)."""
    data = source.encode()
    lines = data.splitlines(keepends=True)
    a0, a1 = _offset(lines, a.lineno, a.col_offset), _offset(lines, a.end_lineno, a.end_col_offset)
    b0, b1 = _offset(lines, b.lineno, b.col_offset), _offset(lines, b.end_lineno, b.end_col_offset)
    return (data[:a0] + data[b0:b1] + data[a1:b0] + data[a0:a1] + data[b1:]).decode()


def _splice_operator(source: str, left: ast.AST, right: ast.AST, old: str, new: str) -> str:
    """Replace the operator written between two operands, leaving its spacing and parentheses."""
    data = source.encode()
    lines = data.splitlines(keepends=True)
    start, end = _offset(lines, left.end_lineno, left.end_col_offset), _offset(lines, right.lineno, right.col_offset)
    gap = data[start:end].decode()
    boundary = r"\b" if old[0].isalpha() else r"(?<![<>=!*/%+\-])"
    after = r"\b" if old[-1].isalpha() else r"(?![<>=*/])"
    changed = re.sub(boundary + re.escape(old).replace(r"\ ", r"\s+") + after, new, gap, count=1)
    return (data[:start] + changed.encode() + data[end:]).decode()


def _splice(source: str, node: ast.AST, text: str) -> str:
    """Replace the source span of `node` (UTF-8 byte columns, as ast reports them) with `text`,
    indenting continuation lines of a multi-line replacement like the node's first line."""
    lines = source.encode().splitlines(keepends=True)
    start_line, end_line = node.lineno - 1, node.end_lineno - 1
    indent = lines[start_line][: node.col_offset].decode()
    if "\n" in text:
        pad = " " * len(indent) if not indent.strip() else ""
        text = text.replace("\n", "\n" + pad)
    before = lines[start_line][: node.col_offset]
    after = lines[end_line][node.end_col_offset:]
    return b"".join(lines[:start_line] + [before + text.encode() + after] + lines[end_line + 1 :]).decode()


def mutate(source: str, rng: random.Random, kinds: tuple[str, ...] = KINDS, min_line: int = 1) -> Mutation | None:
    """One bug in the first function of `source`, at or after `min_line`; None if no place fits.
    The kind is drawn uniformly among the kinds that have a place, then the place uniformly."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    function = next((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    if function is None:
        return None
    skip = _docstring_nodes(tree) | _neutral_nodes(tree)
    by_kind: dict[str, list[_Site]] = {}
    for site in _sites(function, skip):
        if site.kind in kinds and site.node.lineno >= min_line:
            by_kind.setdefault(site.kind, []).append(site)
    original = ast.dump(tree)
    while by_kind:
        kind = rng.choice(sorted(by_kind))
        site = by_kind[kind].pop(rng.randrange(len(by_kind[kind])))
        if not by_kind[kind]:
            del by_kind[kind]
        buggy = site.edit(source)
        try:
            if ast.dump(ast.parse(buggy)) != original:
                return Mutation(kind, buggy, site.node.lineno)
        except SyntaxError:
            continue
    return None
