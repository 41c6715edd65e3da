"""Functions and methods with docstrings, cut out of real source files with `ast`.

Each `Function` keeps its exact source text, dedented to column 0: `header` runs from the first
decorator to the end of the docstring, `body` is the rest, and `after` is the code that follows
it in its file (up to AFTER_LINES lines; the suffix of the docstring task in fill-in-the-middle
form). Task builders share this.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Iterator

AFTER_LINES = 12

@dataclass(frozen=True)
class Function:
    name: str
    path: str
    line: int
    header: str  # decorators + signature + docstring
    body: str  # the statements after the docstring
    docstring: str
    statements: int  # statements after the docstring
    after: str = ""  # the lines that follow the function in its file, dedented as it is

    @property
    def source(self) -> str:
        return self.header + self.body


def _is_trivial(statements: list[ast.stmt]) -> bool:
    """A body that does nothing worth learning: pass, ..., raise NotImplementedError, return None."""
    if len(statements) != 1:
        return not statements
    only = statements[0]
    if isinstance(only, ast.Pass):
        return True
    if isinstance(only, ast.Expr) and isinstance(only.value, ast.Constant) and only.value.value is Ellipsis:
        return True
    if isinstance(only, ast.Return) and (only.value is None or (isinstance(only.value, ast.Constant) and only.value.value is None)):
        return True
    if isinstance(only, ast.Raise) and only.exc is not None:
        exc = only.exc.func if isinstance(only.exc, ast.Call) else only.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


def _dedent(lines: list[str], indent: int) -> str:
    """Remove the def's own indentation (and no more: docstring lines may sit further left)."""
    return "".join(line[indent:] if line[:indent].strip() == "" else line.lstrip() for line in lines)


def functions_with_docstrings(source: str, path: str, counts: dict[str, int]) -> Iterator[Function]:
    """Every non-trivial documented function in `source`; `counts` tallies what was skipped and why."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        counts["unparsable_file"] = counts.get("unparsable_file", 0) + 1
        return
    lines = source.splitlines(keepends=True)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        docstring = ast.get_docstring(node, clean=False)
        if docstring is None:
            continue
        statements = node.body[1:]
        if _is_trivial(statements):
            counts["trivial_body"] = counts.get("trivial_body", 0) + 1
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        split = node.body[0].end_lineno
        if statements[0].lineno <= split:  # body on the docstring's line: no clean cut
            counts["unparsable"] = counts.get("unparsable", 0) + 1
            continue
        indent = len(lines[start]) - len(lines[start].lstrip())
        header, body = (_dedent(lines[a:b], indent) for a, b in ((start, split), (split, node.end_lineno)))
        after = _dedent(lines[node.end_lineno : node.end_lineno + AFTER_LINES], indent)
        function = Function(node.name, path, node.lineno, header, body.rstrip() + "\n", docstring, len(statements),
                            after)
        try:
            ast.parse(function.source)
        except SyntaxError:
            counts["unparsable"] = counts.get("unparsable", 0) + 1
            continue
        yield function
