"""The English and Chinese READMEs name every setting and command, match in shape, and curl only
paths the service serves and documents."""

from __future__ import annotations

import ast
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest
from werkzeug.exceptions import HTTPException

from app.core.config import ENV_SETTINGS
from app.runtime.cli import main
from app.web.relay import PREFIXES

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("README.md", "README.zh-CN.md")
SWITCH = {"README.md": "English | [简体中文](README.zh-CN.md)",
          "README.zh-CN.md": "[English](README.md) | 简体中文"}
DATA_FLAGS = {"-d", "--data", "--data-raw", "--data-binary", "--data-urlencode", "-F", "--form",
              "--json"}
FENCE = re.compile(r"^\s*```\s*([\w+-]*)")


def _read(name: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Split a README into its prose lines and its fenced code blocks (language, text)."""
    prose: list[str] = []
    blocks: list[tuple[str, str]] = []
    lang: str | None = None
    body: list[str] = []
    for line in (ROOT / name).read_text(encoding="utf-8").splitlines():
        fence = FENCE.match(line)
        if fence and lang is None:
            lang, body = fence.group(1), []
        elif fence and line.strip() == "```":
            blocks.append((lang or "", "\n".join(body)))
            lang = None
        elif lang is None:
            prose.append(line)
        else:
            body.append(line)
    assert lang is None, f"{name}: a code block is never closed"
    return prose, blocks


def _command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Return every leaf command of the `xiaoyi` group as a path of names."""
    found: list[tuple[str, ...]] = []
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            found += _command_paths(command, (*prefix, name))
        else:
            found.append((*prefix, name))
    return found


def _slug(heading: str) -> str:
    """Return GitHub's anchor for a heading's text."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(prose: list[str]) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in prose:
        heading = re.match(r"^#{1,6} (.+)$", line)
        if heading:
            slug = _slug(heading.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _curl_calls(code: str) -> list[tuple[str, str]]:
    """Return (method, URL) of every curl command in a shell block."""
    tokens = shlex.split(code.replace("\\\n", " "), comments=True)
    calls: list[tuple[str, str]] = []
    commands: list[list[str]] = []
    for token in tokens:
        if token == "curl":
            commands.append([])
        elif commands:
            commands[-1].append(token)
    for args in commands:
        method = "POST" if DATA_FLAGS & set(args) else "GET"
        for flag in ("-X", "--request"):
            if flag in args:
                method = args[args.index(flag) + 1].upper()
        calls += [(method, a) for a in args if re.match(r"https?://", a)]
    return calls


def _openapi_templates(app: Any) -> list[re.Pattern[str]]:
    """Return the documented API paths (relative to a prefix) as patterns."""
    spec = app.test_client().get("/openapi.json").get_json()
    patterns = []
    for path in spec["paths"]:
        relative = path.removeprefix("/v1")
        patterns.append(re.compile(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(relative)) + "$"))
    return patterns


@pytest.mark.parametrize("name", NAMES)
def test_every_environment_setting_is_documented(name: str) -> None:
    """Every XIAOYI_* variable the config reads appears in the README."""
    prose, blocks = _read(name)
    text = "\n".join(prose + [code for _, code in blocks])
    missing = [var for var in ENV_SETTINGS
               if not re.search(rf"(?<![A-Z0-9_]){var}(?![A-Z0-9_])", text)]
    assert not missing, f"{name} does not mention {missing}"


ENV_READ = re.compile(r"os\.environ(?:\.get\(|\[)\s*[\"']([A-Z][A-Z0-9_]*)[\"']")
XIAOYI_NAME = re.compile(r"[\"'](XIAOYI_[A-Z0-9_]*[A-Z0-9])[\"']")
CODE_DIRS = ("app", "workers", "fakes", "deploy")


def _env_read_by_code() -> set[str]:
    """Return every environment variable the shipped code names: os.environ reads, XIAOYI_*."""
    names: set[str] = set()
    for folder in CODE_DIRS:
        for path in (ROOT / folder).rglob("*.py"):
            source = path.read_text(encoding="utf-8")
            names |= set(ENV_READ.findall(source)) | set(XIAOYI_NAME.findall(source))
    return names


def _mentions(text: str, word: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(word)}(?![A-Za-z0-9_])", text) is not None


@pytest.mark.parametrize("name", NAMES)
def test_every_environment_variable_the_code_reads_is_documented(name: str) -> None:
    """Not only the config's settings: gunicorn's knobs, proxies, CA bundles read by name too."""
    text = (ROOT / name).read_text(encoding="utf-8")
    names = _env_read_by_code()
    assert {"WEB_CONCURRENCY", "XIAOYI_WEB_KEEPALIVE", "XIAOYI_REDIS_URL"} <= names, names
    missing = sorted(var for var in names if not _mentions(text, var))
    assert not missing, f"{name} does not mention {missing}"


# Tables whose keys are settings a reader sets one by one (prices, models, texts and the menu
# are data: the README shows their shape and points at the file).
TOML_TABLES = ("relay", "limits", "bot", "pay", "safety")


@pytest.mark.parametrize("name", NAMES)
def test_every_toml_setting_is_documented(name: str) -> None:
    """Every key of app/core/defaults.toml's setting tables appears in the README."""
    text = (ROOT / name).read_text(encoding="utf-8")
    defaults = tomllib.loads((ROOT / "app/core/defaults.toml").read_text(encoding="utf-8"))
    keys = [f"{table}.{key}" for table in TOML_TABLES for key in defaults[table]]
    assert len(keys) >= 50, keys
    missing = [k for k in keys if not _mentions(text, k.split(".", 1)[1])]
    assert not missing, f"{name} does not mention {missing}"


@pytest.mark.parametrize("name", NAMES)
def test_every_cli_command_is_documented(name: str) -> None:
    """Every `xiaoyi` subcommand appears as `xiaoyi …` (or `` `group sub` `` for a subcommand)."""
    text = (ROOT / name).read_text(encoding="utf-8")
    paths = _command_paths(main)
    assert len(paths) >= 16, paths  # the walk found the nested groups
    missing = []
    for path in paths:
        words = r"\s+".join(re.escape(p) for p in path)
        forms = [rf"xiaoyi\s+{words}(?![\w-])"] + ([rf"`{words}(?![\w-])"] if len(path) > 1 else [])
        if not any(re.search(form, text) for form in forms):
            missing.append("xiaoyi " + " ".join(path))
    assert not missing, f"{name} does not mention {missing}"


def test_same_number_of_top_level_sections() -> None:
    """Both READMEs have as many `## ` sections."""
    counts = {}
    for name in NAMES:
        prose, _ = _read(name)
        counts[name] = [line for line in prose if line.startswith("## ")]
    english, chinese = (counts[n] for n in NAMES)
    assert len(english) == len(chinese), (english, chinese)
    assert len(english) >= 8


@pytest.mark.parametrize("name", NAMES)
def test_language_switch_and_anchors(name: str) -> None:
    """Each README links the other at the top, and every in-page link has its heading."""
    prose, _ = _read(name)
    assert SWITCH[name] in prose[:5], f"{name}: no language switch near the top"
    anchors = _anchors(prose)
    links = re.findall(r"\]\(#([^)]+)\)", "\n".join(prose))
    broken = sorted({link for link in links if link not in anchors})
    assert not broken, f"{name}: links to missing headings {broken}"


@pytest.mark.parametrize("name", NAMES)
def test_curl_examples_use_documented_paths(name: str, app: Any) -> None:
    """Every ```bash block starting with curl calls a served route the docs describe."""
    prose, blocks = _read(name)
    text = "\n".join(prose)
    adapter = app.url_map.bind("localhost")
    templates = _openapi_templates(app)
    checked = 0
    for lang, code in blocks:
        if lang != "bash" or not code.lstrip().startswith("curl"):
            continue
        for method, url in _curl_calls(code):
            path = re.sub(r"^https?://[^/]+", "", url).split("?")[0] or "/"
            try:
                endpoint, _ = adapter.match(path, method=method)
            except HTTPException as exc:
                pytest.fail(f"{name}: {method} {path} is not served ({exc.code})")
            prefix = next((p for p in PREFIXES if path.startswith(p + "/")), None)
            if endpoint.split(".")[0].startswith("relay") and prefix:
                rest = path[len(prefix):]
                assert any(t.match(rest) for t in templates), \
                    f"{name}: {path} is not in /openapi.json"
            else:
                assert path in text, f"{name}: {path} is curled but never described"
            checked += 1
    if name == "README.zh-CN.md":
        assert checked >= 4  # the Chinese quick start's curl examples were found and checked


REPO_DIRS = ("app", "workers", "fakes", "deploy", "bench", "tests")
PATH_IN_CODE = re.compile(rf"(?<![\w./$-])((?:{'|'.join(REPO_DIRS)})/[^\s`'\"),;:]*)")
DOTTED_IN_CODE = re.compile(r"(?<![\w./$-])((?:app|workers)(?:\.\w+)+)(?![\w/])")


def _code_spans(name: str) -> list[str]:
    """Return the text of every inline `code` span in a README's prose (tables included)."""
    prose, _ = _read(name)
    return re.findall(r"`([^`\n]+)`", "\n".join(prose))


def _ignored(path: str) -> bool:
    """Tell whether .gitignore names the path: local state the project makes (bench/out/…)."""
    entries = [line.strip().rstrip("/") for line in (ROOT / ".gitignore").read_text().splitlines()
               if line.strip() and not line.startswith("#") and "*" not in line]
    return any((path.rstrip("/") + "/").startswith(e + "/") for e in entries)


def _defined(body: list[ast.stmt]) -> dict[str, ast.stmt]:
    """Return the names a module or class body defines (def, class, assignment, import)."""
    names: dict[str, ast.stmt] = {}
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names[node.name] = node
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update({t.id: node for t in targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update({(a.asname or a.name).split(".")[0]: node for a in node.names})
    return names


def _resolves(dotted: str) -> bool:
    """Tell whether a dotted name is a module of ours or a name one defines (read, not run)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:cut])
        found = [f for f in (base.with_suffix(".py"), base / "__init__.py") if f.is_file()]
        if not found:
            continue
        body: list[ast.stmt] = ast.parse(found[0].read_text(encoding="utf-8")).body
        for attr in parts[cut:]:
            node = _defined(body).get(attr)
            if node is None:
                return False
            body = node.body if isinstance(node, ast.ClassDef) else []
        return True
    return False


@pytest.mark.parametrize("name", NAMES)
def test_named_paths_exist(name: str) -> None:
    """Every repository path in `code` (app/…, tests/…, deploy/…) exists, or is ignored state."""
    paths = {m for span in _code_spans(name) for m in PATH_IN_CODE.findall(span)}
    assert len(paths) >= 20, paths  # the README's paths were found
    # <thing> and … are placeholders: any name there will do
    missing = sorted(p for p in paths
                     if not any(ROOT.glob(re.sub(r"<[^>]*>|…", "*", p.rstrip("/"))))
                     and not _ignored(p))
    assert not missing, f"{name} names paths that do not exist: {missing}"


@pytest.mark.parametrize("name", NAMES)
def test_named_modules_exist(name: str) -> None:
    """Every dotted name of ours in `code` (app.edges.pay.start_order, …) can be imported."""
    names = {m for span in _code_spans(name) for m in DOTTED_IN_CODE.findall(span)}
    wrong = sorted(n for n in names if not _resolves(n))
    assert not wrong, f"{name} names modules or functions that do not exist: {wrong}"


@pytest.mark.parametrize("name", NAMES)
def test_make_run_names_an_old_python_and_how_to_choose_another(name: str,
                                                                tmp_path: Path) -> None:
    """Both READMEs say Python 3.11+ and `make run PY=…`; make says so itself, before it builds
    a venv on an older interpreter (whose pip would fail on a dependency, naming none of this)."""
    import shutil
    import subprocess

    assert "PY=python3.12" in (ROOT / name).read_text(encoding="utf-8")
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make on this machine")
    for file in ("Makefile", "pyproject.toml", "requirements.lock"):
        shutil.copy(ROOT / file, tmp_path / file)
    old = tmp_path / "old-python"
    old.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "Python 3.10.12" && exit 0\nexit 1\n')
    old.chmod(0o755)
    for py, said in ((str(old), "Python 3.10.12"), ("no-such-python3", "not found")):
        done = subprocess.run([make, "-s", "run", f"PY={py}"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode != 0 and not (tmp_path / ".venv").exists()
        assert f"xiaoyi needs Python 3.11 or newer, and {py} is {said}" in done.stderr
        assert "make run PY=python3.11" in done.stderr
