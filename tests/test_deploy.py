"""deploy/: the compose file, nginx, Redis, systemd units, Dockerfile and gunicorn config hold up."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import redis
import yaml
from proc_kit import free_port

from app.core.config import load_settings
from app.core.errors import RequestTooLarge
from app.runtime.embedded import find_server_binary
from app.web.relay import PREFIXES

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def test_compose_names_every_service_and_keeps_redis_durable() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"redis", "web", "worker", "nginx"} <= set(services)
    for name in ("web", "worker"):
        assert services[name]["deploy"]["replicas"] == 2
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / services[name]["build"]["context"] / "deploy/Dockerfile").exists()
        money = services[name]["environment"]["XIAOYI_REDIS_URL"]  # ${XIAOYI_MONEY_URL:-default}
        assert re.fullmatch(r"\$\{XIAOYI_MONEY_URL:-redis://redis:6379/0\}", money)
        assert services[name]["environment"]["XIAOYI_QUEUE_REDIS_URL"] == "redis://redis:6379/0"
        assert services[name]["depends_on"]["money-init"]["required"] is False
    assert "xiaoyi web" in " ".join(services["web"]["command"])
    assert "xiaoyi worker" in " ".join(services["worker"]["command"])
    redis_svc = services["redis"]
    assert any(v.endswith(":/data") for v in redis_svc["volumes"])
    assert "redis-data" in compose["volumes"]
    conf_mount = next(v for v in redis_svc["volumes"] if "redis.conf" in v)
    assert (DEPLOY / conf_mount.split(":")[0]).exists()
    assert conf_mount.split(":")[1] in redis_svc["command"]
    for node in ("money-1", "money-2", "money-3"):  # the cluster profile
        assert services[node]["profiles"] == ["cluster"] and "--cluster-enabled yes" in " ".join(
            services[node]["command"])
        assert any(v.endswith(":/data") for v in services[node]["volumes"])
    assert "--cluster create" in " ".join(services["money-init"]["command"])
    nginx = services["nginx"]
    assert any(v.startswith("./nginx.conf:") for v in nginx["volumes"])
    assert "443:443" in nginx["ports"] and "ports" not in redis_svc


def api_location(body: str) -> str:
    """Return the body of nginx.conf's developer-API location; check it serves every prefix.

    The location is the one regex location; its pattern (PCRE, here also valid Python) must
    take every prefix the relay serves (app.web.relay.PREFIXES) and nothing else of the site.
    """
    (found,) = re.findall(r"location ~ (\S+) \{(.*?)\}", body, re.S)
    pattern, block = found
    for prefix in PREFIXES:
        assert re.match(pattern, prefix + "/chat/completions"), prefix
    for other in ("/wechat", "/admin/login", "/healthz", "/index.php/x/v1/models", "/v2/models"):
        assert not re.match(pattern, other), other
    return block


def test_nginx_api_location_takes_every_relay_prefix() -> None:
    body = re.sub(r"#.*", "", (DEPLOY / "nginx.conf").read_text())
    assert PREFIXES == ("/v1", "/index.php/api/v1", "/index.php/v1")
    assert re.search(r"proxy_buffering\s+off;", api_location(body))


def test_nginx_streams_sse_unbuffered_with_long_timeouts() -> None:
    conf = (DEPLOY / "nginx.conf").read_text()
    body = re.sub(r"#.*", "", conf)
    assert body.count("{") == body.count("}")
    api = api_location(body)
    assert re.search(r"proxy_buffering\s+off;", api)
    timeout = re.search(r"proxy_read_timeout\s+(\d+)s;", api)
    assert timeout and int(timeout[1]) >= 300
    assert "ssl_certificate " in body and "ssl_certificate_key" in body
    assert "server web:8000" in body and "X-Forwarded-Proto" in body


def _size(value: str) -> int:
    """Turn an nginx size (32m, 1k, 512) into bytes."""
    return int(value[:-1]) << {"k": 10, "m": 20}[value[-1]] if value[-1] in "km" else int(value)


def test_nginx_buffers_request_bodies_and_bounds_slow_clients() -> None:
    body = re.sub(r"#.*", "", (DEPLOY / "nginx.conf").read_text())
    api = api_location(body)
    assert re.search(r"proxy_request_buffering\s+on;", api)
    assert "proxy_request_buffering off" not in body and re.search(r"proxy_buffering\s+off;", api)
    timeouts = [int(t) for t in re.findall(r"client_body_timeout\s+(\d+)s;", body)]
    assert timeouts and max(timeouts) <= 30 and re.search(r"client_body_timeout", api)
    header = re.search(r"client_header_timeout\s+(\d+)s;", body)
    assert header and int(header[1]) <= 30
    size = re.search(r"client_max_body_size\s+(\d+[km]?);", api)
    assert size and _size(size[1]) == 32 << 20  # SPEC §3: the relay's default body limit
    assert _size(size[1]) >= load_settings({}).relay["max_body_bytes"]
    page = re.search(r"error_page\s+413\s+=\s+(@\w+);", api)
    assert page, "nginx's own 413 must keep the relay's JSON shape"
    named = re.search(rf"location {page[1]} \{{(.*?)\n\s*\}}", body, re.S)
    answer = named and re.search(r"return 413 '(.*)';", named[1])
    assert answer and json.loads(answer[1]) == RequestTooLarge(
        "The request body is larger than the limit.").body()


def directives(text: str) -> dict[str, str]:
    """Return a redis.conf's directives (last one wins)."""
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, value = line.partition(" ")
            out[name.lower()] = value.strip()
    return out


@pytest.mark.parametrize("cluster", [False, True], ids=["single", "cluster-node"])
def test_redis_conf_is_durable_and_loads(tmp_path: Path, cluster: bool) -> None:
    conf = directives((DEPLOY / "redis.conf").read_text())
    assert conf["appendonly"] == "yes" and conf["appendfsync"] == "always"
    assert conf["maxmemory-policy"] == "noeviction"
    port = free_port(span=10_000)
    extra: list[str] = []
    if cluster:  # the flags of compose.yaml's money-1..3 (the cluster profile)
        compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
        line = compose["services"]["money-1"]["command"][-1]
        extra = line.split("--bind 0.0.0.0 --protected-mode no ")[1].replace(
            "$$(hostname)", "money-1").replace("/data/", f"{tmp_path}/").split()
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen([find_server_binary(), str(DEPLOY / "redis.conf"), "--port",
                             str(port), "--dir", str(tmp_path), "--daemonize", "no", *extra],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        client = redis.Redis(port=port, decode_responses=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        if cluster:
            assert client.info("cluster")["cluster_enabled"] == 1
        client.close()
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def unit(name: str) -> configparser.ConfigParser:
    """Parse a systemd unit file."""
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((DEPLOY / "systemd" / name).read_text())
    return parser


def test_systemd_units() -> None:
    web, worker = unit("xiaoyi-web.service"), unit("xiaoyi-worker@.service")
    assert web["Service"]["ExecStart"].endswith("xiaoyi web --host 127.0.0.1 --port 8000")
    assert "xiaoyi worker --queues chat,image" in worker["Service"]["ExecStart"]
    for u in (web, worker):
        assert u["Service"]["Restart"] == "always"
        assert u["Service"]["EnvironmentFile"] == "/etc/xiaoyi/xiaoyi.env"
        assert u["Install"]["WantedBy"] == "multi-user.target"
    assert web["Service"]["Environment"].startswith("PROMETHEUS_MULTIPROC_DIR=/run/xiaoyi/")
    # `xiaoyi` imports prometheus_client at start: the directory must exist before gunicorn runs.
    prom = web["Service"]["Environment"].split("=", 1)[1].removeprefix("/run/")
    assert prom in web["Service"]["RuntimeDirectory"].split()
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    out = subprocess.run([analyze, "verify", str(DEPLOY / "systemd" / "xiaoyi-web.service"),
                          str(DEPLOY / "systemd" / "xiaoyi-worker@.service")],
                         capture_output=True, text=True, timeout=30)
    problems = [line for line in (out.stdout + out.stderr).splitlines()
                if line.strip() and "is not executable" not in line]  # /opt/xiaoyi is absent
    assert problems == []


def test_dockerfile_copies_what_exists() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.1[1-9]", text, re.M)
    for source in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), path
    cmd = re.search(r"^CMD (\[.*\])$", text, re.M)
    assert cmd and json.loads(cmd[1])[:2] == ["xiaoyi", "web"]
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    assert "!app/" in ignore and ignore.splitlines()[1].strip() == "*"


def test_dockerfile_installs_the_lock_and_its_sources_pass_the_dockerignore() -> None:
    """The image installs requirements.lock's exact versions, and every COPY source reaches the
    build (the ignore file drops everything it does not let through by name)."""
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"pip install -r requirements\.lock && pip install --no-deps -e \.", text)
    allowed = [line.strip()[1:].rstrip("/") for line in
               (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
               if line.strip().startswith("!")]
    for source in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for path in source.split():
            assert any(path == a or path.startswith(a + "/") for a in allowed), path


def test_deploy_comments_name_files_that_exist() -> None:
    """deploy/ comments point a reader at files of this repository that exist."""
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.suffix != ".pem":
            for named in re.findall(r"(?<![\w./-])((?:docs|deploy)/[\w./@-]+\.\w+)",
                                    path.read_text(encoding="utf-8")):
                assert (ROOT / named).exists(), f"{path.name} names {named}"
        if path.is_file():
            assert ".env.example" not in path.read_text(encoding="utf-8"), path.name


@pytest.mark.parametrize("preset", [False, True])
def test_gunicorn_conf_sets_up_multiprocess_metrics(tmp_path: Path, preset: bool) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    stale = tmp_path / "prom" / "counter_123.db"
    if preset:
        stale.parent.mkdir()
        stale.write_bytes(b"old")
        env["PROMETHEUS_MULTIPROC_DIR"] = str(stale.parent)
    script = ("import os, runpy, json; c = runpy.run_path('deploy/gunicorn.conf.py'); "
              "print(json.dumps([c['worker_class'], c['timeout'], "
              "os.environ['PROMETHEUS_MULTIPROC_DIR']]))")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True, timeout=30)
    worker_class, timeout, prom = json.loads(out.stdout)
    assert worker_class == "gevent" and timeout >= 60
    assert Path(prom).is_dir()
    if preset:
        assert prom == str(stale.parent) and not stale.exists()
    else:
        shutil.rmtree(prom)


def test_a_worker_leaves_the_loaded_app_out_of_garbage_collection() -> None:
    """post_worker_init (after the app is loaded in the worker) freezes what exists and raises
    the young generation's threshold (bench/NOTES.md)."""
    script = ("import gc, json, runpy, types; c = runpy.run_path('deploy/gunicorn.conf.py'); "
              "before = gc.get_freeze_count(); "
              "c['post_worker_init'](types.SimpleNamespace(handle_exit=lambda *a: None, "
              "alive=True, cfg=types.SimpleNamespace(graceful_timeout=30))); "
              "print(json.dumps([before, gc.get_freeze_count(), gc.get_threshold()]))")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=30)
    before, frozen, threshold = json.loads(out.stdout)
    assert before == 0 and frozen > 1000
    assert threshold[0] >= 10_000


def test_readme_has_every_operations_section() -> None:
    doc = (ROOT / "README.md").read_text()
    for section in ("Admin", "Metrics", "Channels", "Limits", "Pay", "Deploy", "Scale out"):
        assert re.search(rf"^### {section}\b", doc, re.M), section
    for section in ("Connect your official account", "Reliability", "Benchmarks", "Architecture",
                    "Configuration"):
        assert re.search(rf"^##+ {section}\b", doc, re.M), section


def test_a_worker_tries_its_queued_settlements_once_more_as_it_exits(
        tmp_path: Path, redis_url: str) -> None:
    """worker_exit (gunicorn's hook, as the worker ends) gives the settlements still queued
    for Redis (app/web/relay/settle_later.py) one more try; what still fails stays queued."""
    script = (
        "import json, runpy, types\n"
        "from app import create_app\n"
        "from app.web.relay import settle_later\n"
        "from redis import ConnectionError\n"
        "c = runpy.run_path('deploy/gunicorn.conf.py')\n"
        "app = create_app()\n"
        "later, ran = settle_later.of(app), []\n"
        "def down(): raise ConnectionError('still down')\n"
        "later.add('req-1', lambda: ran.append('req-1'))\n"
        "later.add('req-2', down)\n"
        "c['worker_exit'](None, types.SimpleNamespace(wsgi=app))\n"
        "print(json.dumps([ran, later.pending()]))\n")
    env = {**os.environ, "XIAOYI_REDIS_URL": redis_url, "XIAOYI_ALLOW_VOLATILE_STORE": "1",
           "XIAOYI_LOG_LEVEL": "WARNING", "XIAOYI_DATA_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True, timeout=60)
    ran, pending = json.loads(out.stdout.strip().splitlines()[-1])
    assert ran == ["req-1"] and pending == 1


def test_the_image_holds_every_package_the_project_installs() -> None:
    """`pip install -e .` in the image finds app, workers and fakes (pyproject's packages): one
    missing from the COPY lines, or dropped by the ignore file, is a ModuleNotFoundError at run
    time (`xiaoyi web` without an upstream runs `fakes.upstream`)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    packages = [p.rstrip("*") for p in
                project["tool"]["setuptools"]["packages"]["find"]["include"]]
    text = (DEPLOY / "Dockerfile").read_text()
    copied = {path for source in re.findall(r"^COPY (.+) \S+$", text, re.M)
              for path in source.split()}
    allowed = {line.strip()[1:].rstrip("/") for line in
               (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
               if line.strip().startswith("!")}
    assert packages and all((ROOT / p).is_dir() for p in packages)
    for package in packages:
        assert package in copied, f"deploy/Dockerfile does not COPY {package}/"
        assert package in allowed, f"deploy/Dockerfile.dockerignore drops {package}/"
