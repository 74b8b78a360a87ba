"""The shape of nightcrier.py: sections under banners, listed by the docstring, none using a later one.

The module is read from top to bottom: each section may use what the sections above it define, never
what a later one defines, so that a reader meets every name before it is used. The checks here work
on the source text alone, so they say which name in which section breaks the order.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

MODULE = Path(__file__).resolve().parent.parent / "nightcrier.py"
BANNER_RE = re.compile(r"^#{79}\n# (\S.*?) #+\n#{79}$", re.MULTILINE)
TOC_ENTRY_RE = re.compile(r"^ {4}[ \d]\d\. (\S+(?: \S+)*?)(?: {2,}.*)?$")


@dataclass(frozen=True)
class LaterNameUse:
    """A name used in ``section`` (at ``line``) but defined at top level in the later ``defined_in``."""

    section: str
    name: str
    defined_in: str
    line: int


def banners(source: str) -> list[tuple[str, int]]:
    """(section name, line of its banner) for each banner comment, in order."""
    return [(m.group(1), source.count("\n", 0, m.start()) + 1) for m in BANNER_RE.finditer(source)]


def table_of_contents(docstring: str) -> list[str]:
    """The section names the module docstring lists under "Contents", in order."""
    lines = docstring.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Contents")), None)
    if start is None:
        return []
    return [m.group(1) for line in lines[start + 1:] if (m := TOC_ENTRY_RE.match(line))]


def top_level_names(node: ast.stmt) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return set()


def _bound_in(scope: ast.AST) -> set[str]:
    """Names a function, lambda or comprehension binds for itself (its locals), minus `global` ones."""
    bound: set[str] = set()
    declared_global: set[str] = set()
    if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        args = scope.args
        for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
            if arg is not None:
                bound.add(arg.arg)
        body: list[ast.AST] = [scope.body] if isinstance(scope, ast.Lambda) else list(scope.body)
    else:  # comprehension
        body = [g.target for g in scope.generators]
    pending = list(body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Global):
            declared_global.update(node.names)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
            pending.extend(node.decorator_list)
            continue  # its body is a scope of its own
        if isinstance(node, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            continue
        pending.extend(ast.iter_child_nodes(node))
    return bound - declared_global


SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp,
          ast.GeneratorExp)


def global_uses(node: ast.stmt) -> list[tuple[str, int]]:
    """(name, line) of each name ``node`` reads from module scope, wherever in it, annotations included."""
    uses: list[tuple[str, int]] = []

    def visit(item: ast.AST, shadowed: frozenset[str]) -> None:
        if isinstance(item, ast.Name) and isinstance(item.ctx, ast.Load) and item.id not in shadowed:
            uses.append((item.id, item.lineno))
        inner = shadowed | _bound_in(item) if isinstance(item, SCOPES) else shadowed
        for child in ast.iter_child_nodes(item):
            visit(child, inner)

    visit(node, frozenset())
    return uses


def later_name_uses(source: str) -> list[LaterNameUse]:
    """Every use, in one section, of a top-level name that a later section defines."""
    tree = ast.parse(source)
    sections = banners(source)
    order = {name: index for index, (name, _) in enumerate(sections)}

    def section_of(line: int) -> str | None:
        current = None
        for name, start in sections:
            if start <= line:
                current = name
        return current

    defined_in: dict[str, str] = {}
    for node in tree.body:
        section = section_of(node.lineno)
        for name in top_level_names(node):
            if section is not None:
                defined_in.setdefault(name, section)
    found = []
    for node in tree.body:
        section = section_of(node.lineno)
        own = top_level_names(node)
        for name, line in global_uses(node):
            later = defined_in.get(name)
            if name in own or later is None:
                continue
            if section is None or order[later] > order[section]:
                found.append(LaterNameUse(section or "(before the first section)", name, later, line))
    return found


def test_docstring_lists_the_sections_in_banner_order() -> None:
    source = MODULE.read_text(encoding="utf-8")
    listed = table_of_contents(ast.get_docstring(ast.parse(source)) or "")
    assert listed, "the module docstring has no Contents list"
    assert listed == [name for name, _ in banners(source)]


def test_no_section_uses_a_name_defined_in_a_later_one() -> None:
    uses = later_name_uses(MODULE.read_text(encoding="utf-8"))
    assert not uses, "\n".join(f"{u.section} uses {u.name} (line {u.line}), defined later in {u.defined_in}"
                               for u in uses)


def test_the_check_sees_uses_in_functions_and_annotations_but_not_locals() -> None:
    rule = "#" * 79
    source = "\n".join([
        rule, "# Early " + "#" * 71, rule,
        "def early(a: Late) -> None:",
        "    content = 1",
        "    return content + helper() + [x for x in (1,)][0] + (lambda helper: helper)(1)",
        rule, "# Later " + "#" * 71, rule,
        "class Late: ...",
        "def helper() -> int: return 1",
        "content = 2",
        "x = 3",
    ])
    assert [(u.section, u.name, u.defined_in) for u in later_name_uses(source)] == [
        ("Early", "Late", "Later"), ("Early", "helper", "Later")]


def test_the_contents_list_is_read_in_order() -> None:
    doc = "Intro.\n\nContents, in order:\n\n     1. Utilities  logging\n     2. MCP client  one session\n"
    assert table_of_contents(doc) == ["Utilities", "MCP client"]
