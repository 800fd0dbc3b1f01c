"""The import direction the README's Architecture section draws, read from the source with `ast`.

core ← edges ← bot ← web ← the factory (`app/factory.py`, `app/__init__.py`) ← runtime; `workers/` use core, edges
and bot; `fakes/` stand alone. Every import counts for the direction: at module level, inside
functions and under `TYPE_CHECKING`. `python -m pytest tests/test_layers.py -q` checks the rules;
`python tests/test_layers.py` prints how many import statements go from each layer to each other.
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("app", "workers", "fakes")
APP_LAYERS = ("core", "edges", "bot", "web", "runtime")
# What each layer must never import; "app" is the factory, app/factory.py and app/__init__.py.
FORBIDDEN: dict[str, frozenset[str]] = {
    "app.core": frozenset({"app.edges", "app.bot", "app.web", "app.runtime", "app", "workers",
                           "fakes"}),
    "app.edges": frozenset({"app.bot", "app.web", "app.runtime", "app", "workers", "fakes"}),
    "app.bot": frozenset({"app.web", "app.runtime", "app", "workers", "fakes"}),
    "app.web": frozenset({"app.runtime", "app", "workers", "fakes"}),
    "app": frozenset({"app.runtime", "workers", "fakes"}),
    # runtime starts the fake upstream (`xiaoyi run`, `xiaoyi fake-upstream`), never runs a job
    "app.runtime": frozenset({"workers"}),
    "workers": frozenset({"app.web", "app.runtime", "app", "fakes"}),
    "fakes": frozenset({"app.core", "app.edges", "app.bot", "app.web", "app.runtime", "app",
                        "workers"}),
}
# Web modules that are no blueprint: every blueprint and the factory may import them.
WEB_SHARED = frozenset({"render"})


@dataclass(frozen=True)
class Import:
    """One imported name (a module, or module.name), as seen from the module importing it."""

    source: str  # dotted module name of the importer
    path: str  # repository-relative file
    line: int
    target: str
    typing_only: bool  # under `if TYPE_CHECKING:`: never executed


def module_name(path: Path) -> str:
    """Return the dotted module name of a source file under ROOT."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> list[Path]:
    """Return every Python file of the app, the jobs and the fakes."""
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _is_type_checking(test: ast.expr) -> bool:
    """Tell whether an `if` test is `TYPE_CHECKING` or `typing.TYPE_CHECKING`."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, typing_only: bool = False) -> Iterator[tuple[ast.AST, bool]]:
    """Yield every node with whether it sits under `if TYPE_CHECKING:`."""
    for child in ast.iter_child_nodes(node):
        inside = typing_only or (isinstance(node, ast.If) and _is_type_checking(node.test)
                                 and any(child is stmt for stmt in node.body))
        yield child, inside
        yield from _walk(child, inside)


def imports_of(path: Path, text: str | None = None) -> Iterator[Import]:
    """Yield every import in a file (or in `text`, read as that file) of one of our packages."""
    source = module_name(path)
    package = source if path.name == "__init__.py" else source.rpartition(".")[0]
    rel = str(path.relative_to(ROOT))
    tree = ast.parse(path.read_text(encoding="utf-8") if text is None else text, filename=rel)
    for node, typing_only in _walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importer's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in PACKAGES:
                yield Import(source, rel, node.lineno, target, typing_only)


def layer(module: str) -> str:
    """Return the layer of a dotted module (or module.name)."""
    parts = module.split(".")
    if parts[0] == "app":
        return f"app.{parts[1]}" if len(parts) > 1 and parts[1] in APP_LAYERS else "app"
    return parts[0]


def all_imports() -> list[Import]:
    """Return every import between our packages, file by file."""
    return [imp for path in source_files() for imp in imports_of(path)]


def violations(imports: list[Import]) -> list[str]:
    """Return one line per import that goes against the layer rules."""
    return sorted({f"{imp.path}:{imp.line} {layer(imp.source)} imports {imp.target}"
                   for imp in imports if layer(imp.target) in FORBIDDEN[layer(imp.source)]})


def import_cycles() -> list[list[str]]:
    """Return the import circles between modules (executed imports, lazy ones included)."""
    modules = {module_name(p) for p in source_files()}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in all_imports():
        parts = imp.target.split(".")
        target = next((".".join(parts[:n]) for n in range(len(parts), 0, -1)
                       if ".".join(parts[:n]) in modules), None)
        # a module's own packages are already being imported when it runs: not an edge
        if target and not imp.typing_only and not (imp.source + ".").startswith(target + "."):
            graph[imp.source].add(target)
    return _strongly_connected(graph)


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Return the components of more than one node (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = stack[stack.index(node):]
                    del stack[stack.index(node):]
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in stack:
                low[node] = min(low[node], index[child])
    return found


def test_the_scan_sees_every_layer() -> None:
    """The walk finds every layer and the imports between them, so a pass means something."""
    assert {layer(module_name(p)) for p in source_files()} == set(FORBIDDEN)
    edges = {(layer(i.source), layer(i.target)) for i in all_imports()}
    for expected in [("app.edges", "app.core"), ("app.bot", "app.edges"), ("app.web", "app.bot"),
                     ("app", "app.web"), ("app.runtime", "app"), ("workers", "app.bot")]:
        assert expected in edges, expected
    assert any(i.typing_only for i in all_imports())  # TYPE_CHECKING blocks are seen


def test_the_checks_catch_what_they_forbid() -> None:
    """Upward imports, lazy or typing-only, are reported; a circle is found."""
    probe = ROOT / "app" / "core" / "probe.py"
    text = ("from app.core import errors\n"
            "def f():\n    from app.web.relay import common\n"
            "if TYPE_CHECKING:\n    import workers.chat\n")
    found = violations(list(imports_of(probe, text)))
    assert found == ["app/core/probe.py:3 app.core imports app.web.relay",
                     "app/core/probe.py:3 app.core imports app.web.relay.common",
                     "app/core/probe.py:5 app.core imports workers.chat"], found
    assert _strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _strongly_connected({"a": {"b"}, "b": set()}) == []


def test_import_direction() -> None:
    """core ← edges ← bot ← web ← factory ← runtime; workers use core, edges, bot; fakes alone."""
    found = violations(all_imports())
    assert not found, "\n".join(found)


def test_blueprints_never_import_each_other() -> None:
    """A module of one web blueprint never imports another blueprint (the shared ones excepted)."""
    crossings = sorted(
        f"{imp.path}:{imp.line} {imp.source} imports {imp.target}" for imp in all_imports()
        if layer(imp.source) == layer(imp.target) == "app.web"
        and min(len(imp.source.split(".")), len(imp.target.split("."))) > 2
        and imp.source.split(".")[2] != imp.target.split(".")[2]
        and imp.target.split(".")[2] not in WEB_SHARED)
    assert not crossings, "\n".join(crossings)


def test_jobs_are_enqueued_by_dotted_path() -> None:
    """The app names its rq jobs as strings (`workers.…`) and never imports workers/."""
    names = {node.value for path in (ROOT / "app").rglob("*.py")
             for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(node, ast.Constant) and isinstance(node.value, str)
             and node.value.startswith("workers.")}
    assert {"workers.chat.reply_chat", "workers.images.reply_image",
            "workers.pictures.reply_picture"} <= names, names
    assert not [i for i in all_imports() if layer(i.source).startswith("app")
                and layer(i.target) == "workers"]


def test_shared_web_modules_import_no_blueprint() -> None:
    """What every blueprint may use (WEB_SHARED) imports only the layers below the web."""
    found = sorted(f"{imp.path}:{imp.line} imports {imp.target}" for imp in all_imports()
                   if imp.source.split(".")[2:3] and imp.source.split(".")[2] in WEB_SHARED
                   and layer(imp.source) == "app.web" and layer(imp.target) == "app.web")
    assert not found, "\n".join(found)
    assert all((ROOT / "app" / "web" / f"{name}.py").is_file() for name in WEB_SHARED)


def test_factory_imports_blueprints_only_as_packages() -> None:
    """The factory imports a blueprint as a package (its `init_app`), never a module inside."""
    inside = sorted(f"{imp.path}:{imp.line} imports {imp.target}" for imp in all_imports()
                    if imp.source == "app" and layer(imp.target) == "app.web"
                    and len(imp.target.split(".")) > 3)
    assert not inside, "\n".join(inside)


def test_no_import_circles() -> None:
    """No two modules import each other, directly or around a circle, lazily or not."""
    assert import_cycles() == []


def main() -> None:
    """Print the import statements from each layer to each other layer, then any problem."""
    seen = {(imp.path, imp.line, layer(imp.source), layer(imp.target)) for imp in all_imports()}
    counts = Counter((source, target) for _, _, source, target in seen if source != target)
    for (source, target), count in sorted(counts.items()):
        print(f"{source:12} imports {target:12} {count:4} statements")
    for line in violations(all_imports()):
        print("violation:", line, file=sys.stderr)
    for circle in import_cycles():
        print("circle:", " -> ".join(circle), file=sys.stderr)


if __name__ == "__main__":
    main()
