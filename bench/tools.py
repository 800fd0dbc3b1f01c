"""Install what the benchmark runs besides the project: wrk, LiteLLM's venv, Portkey's gateway."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench.procs import ROOT, log

BENCH_VENV = ROOT / "bench" / ".litellm-venv"  # LiteLLM's proxy and matplotlib; never committed
PORTKEY_DIR = ROOT / "bench" / ".portkey"  # Portkey's gateway from npm; never committed
PORTKEY_PACKAGE = "@portkey-ai/gateway"
PORTKEY_VERSION = "1.15.2"  # the version issue 12 measured; pinned so runs compare
PORTKEY_ENTRY = PORTKEY_DIR / "node_modules" / "@portkey-ai" / "gateway" / "build" / \
    "start-server.js"
# Portkey-AI/gateway#1389: with @hono/node-server ≥ 1.14 the gateway mutates the immutable
# headers of the upstream's response and answers every stream with a 500; 1.13.8 is the last
# release whose Response copies them (npm "overrides" pins it under the gateway).
HONO_NODE_SERVER = "1.13.8"
NODE_MAJOR_MIN = 18


def ensure_wrk() -> str:
    """Return wrk's path, installing Debian's package when missing (as root)."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0:
        sys.exit("wrk is not installed: run `apt-get install -y wrk` (as root) first")
    log("installing wrk (apt-get install -y wrk)")
    if subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"]).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True)
    return shutil.which("wrk") or sys.exit("wrk could not be installed")


def ensure_bench_venv(packages: list[tuple[str, str]]) -> Path:
    """Create bench/.litellm-venv and install the (import name, pip spec) pairs it lacks."""
    python = BENCH_VENV / "bin" / "python"
    if not python.exists():
        log(f"creating {BENCH_VENV.relative_to(ROOT)}")
        base = shutil.which("python3") or sys.executable
        subprocess.run([base, "-m", "venv", str(BENCH_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-U", "pip"], check=True)
    missing = [spec for module, spec in packages if subprocess.run(
        [str(python), "-c", f"import {module}"], capture_output=True).returncode != 0]
    if missing:
        log(f"installing {' '.join(missing)} into {BENCH_VENV.relative_to(ROOT)}")
        subprocess.run([str(python), "-m", "pip", "install", "-q", *missing], check=True)
    return python


def py_spy() -> str | None:
    """Return py-spy's path (installed into the bench venv on first use), None when it fails."""
    found = BENCH_VENV / "bin" / "py-spy"
    if not found.exists():
        try:
            python = ensure_bench_venv([])
            log(f"installing py-spy into {BENCH_VENV.relative_to(ROOT)}")
            subprocess.run([str(python), "-m", "pip", "install", "-q", "py-spy"], check=True)
        except (subprocess.CalledProcessError, OSError) as exc:
            log(f"py-spy could not be installed: {exc}")
            return None
    return str(found) if found.exists() else None


def node_version() -> tuple[str, str]:
    """Return (node's version, '') or ('', why Portkey's gateway cannot run here)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        return "", "Node.js/npm not installed (`apt-get install -y nodejs npm`)"
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
    try:
        major = int(version.lstrip("v").split(".")[0])
    except ValueError:
        return "", f"cannot read node's version ({version!r})"
    if major < NODE_MAJOR_MIN:
        return "", f"node {version} is older than {NODE_MAJOR_MIN}"
    return version, ""


def ensure_portkey() -> tuple[str, str]:
    """Install Portkey's gateway into bench/.portkey; return (its version, '') or ('', why not)."""
    version, why = node_version()
    if why:
        return "", why
    manifest = {"private": True, "dependencies": {PORTKEY_PACKAGE: PORTKEY_VERSION},
                "overrides": {"@hono/node-server": HONO_NODE_SERVER}}
    wanted = json.dumps(manifest, indent=1) + "\n"
    package = PORTKEY_DIR / "package.json"
    if not PORTKEY_ENTRY.exists() or not package.exists() or package.read_text() != wanted:
        log(f"installing {PORTKEY_PACKAGE}@{PORTKEY_VERSION} into "
            f"{PORTKEY_DIR.relative_to(ROOT)} (npm)")
        PORTKEY_DIR.mkdir(parents=True, exist_ok=True)
        package.write_text(wanted, encoding="utf-8")
        done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"],
                              cwd=PORTKEY_DIR, capture_output=True, text=True)
        if done.returncode != 0 or not PORTKEY_ENTRY.exists():
            package.unlink(missing_ok=True)  # retried next time
            return "", f"npm install {PORTKEY_PACKAGE} failed: {done.stderr.strip()[-300:]}"
    return (f"{PORTKEY_PACKAGE} {PORTKEY_VERSION} (@hono/node-server {HONO_NODE_SERVER}) on "
            f"node {version}"), ""
