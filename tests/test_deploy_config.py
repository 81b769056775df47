"""The deployment files agree with the compose spec, with Prometheus' config format and with each other.

No Docker engine runs in CI, so the compose file is checked by the `compose-spec` parser (a Rust implementation of
the Compose Specification) plus the structure this stack needs; prometheus.yml by `promtool check config` when
Debian's `prometheus` package is installed, and always by a structural check of the fields Prometheus accepts.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from compose_spec import PyCompose

from workers.cli import SUBCOMMANDS

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
# deploy/ is not an installed package: load the dashboard generator from its file.
_spec = importlib.util.spec_from_file_location("build_dashboards", DEPLOY / "grafana" / "build_dashboards.py")
build_dashboards = sys.modules.setdefault("build_dashboards", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(build_dashboards)
DATASOURCE = build_dashboards.DATASOURCE
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
PROMETHEUS = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
DASHBOARD_FILES = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
DASHBOARDS = {path.name: json.loads(path.read_text()) for path in DASHBOARD_FILES}

_DURATION = re.compile(r"^((\d+)y)?((\d+)w)?((\d+)d)?((\d+)h)?((\d+)m)?((\d+)s)?((\d+)ms)?$")
_PROMETHEUS_TOP = {"global", "scrape_configs", "rule_files", "alerting", "remote_write", "remote_read", "storage",
                   "tracing", "scrape_config_files"}
_GLOBAL_KEYS = {"scrape_interval", "scrape_timeout", "evaluation_interval", "external_labels", "query_log_file"}
_SCRAPE_KEYS = {"job_name", "scrape_interval", "scrape_timeout", "metrics_path", "scheme", "params", "honor_labels",
                "honor_timestamps", "static_configs", "dns_sd_configs", "file_sd_configs", "docker_sd_configs",
                "relabel_configs", "metric_relabel_configs", "basic_auth", "authorization", "tls_config",
                "sample_limit", "label_limit"}


# --- docker-compose.yml ---------------------------------------------------------------------------------------------
def _dockerfile(service: str) -> str:
    return (ROOT / SERVICES[service]["build"]["dockerfile"]).read_text()


def _named_volumes(service: dict) -> list[str]:
    return [v.split(":")[0] for v in service.get("volumes", []) if not v.startswith((".", "/"))]


def _bind_sources(service: dict) -> list[str]:
    return [v.split(":")[0] for v in service.get("volumes", []) if v.startswith(".")]


def test_compose_parses_under_the_compose_spec():
    # PyYAML resolves the `<<` merge keys first, as `docker compose` does before it validates.
    compose = PyCompose.from_yaml(yaml.safe_dump(COMPOSE))
    assert sorted(compose.service_names()) == ["api", "grafana", "prometheus", "redis", "worker", "worker-cpu"]


def test_every_service_has_a_healthcheck():
    for name, service in SERVICES.items():
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in {"CMD", "CMD-SHELL"}, f"{name} has no healthcheck"


def test_dependencies_volumes_and_bind_mounts_exist():
    for name, service in SERVICES.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in SERVICES, f"{name} depends on unknown service {dependency}"
        for volume in _named_volumes(service):
            assert volume in COMPOSE["volumes"], f"{name} uses undeclared volume {volume}"
        for source in _bind_sources(service):
            assert (ROOT / source).exists(), f"{name} mounts missing {source}"


def test_redis_persists_with_aof_on_a_volume():
    redis = SERVICES["redis"]
    assert redis["image"].startswith("redis:7")
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in redis["volumes"])


def test_api_and_workers_share_redis_and_run_the_cli():
    for name in ("api", "worker", "worker-cpu"):
        assert SERVICES[name]["environment"]["KVC_REDIS_URL"] == "redis://redis:6379/0"
        assert SERVICES[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert SERVICES["api"]["command"][:2] == ["kvcompact", "serve"]
    assert "0.0.0.0" in SERVICES["api"]["command"]
    assert SERVICES["worker"]["command"][:2] == ["kvcompact", "worker"]
    assert SERVICES["worker-cpu"]["command"][:2] == ["kvcompact", "worker"]


@pytest.mark.parametrize("name", ["api", "worker", "worker-cpu"])
def test_service_commands_parse_with_the_real_cli(name):
    """Each container command is accepted by the `kvcompact` sub-command parser it runs (flags included)."""
    program, command, *flags = SERVICES[name]["command"]
    assert program == "kvcompact" and command in SUBCOMMANDS
    parser = argparse.ArgumentParser(prog=f"kvcompact {command}", exit_on_error=False)
    importlib.import_module(SUBCOMMANDS[command][0]).add_arguments(parser)
    parser.parse_args(flags)


def test_gpu_worker_reserves_a_gpu_and_the_cpu_worker_is_an_opt_in_profile():
    devices = SERVICES["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "profiles" not in SERVICES["worker"], "the GPU worker must start with a plain `docker compose up -d`"
    assert SERVICES["worker-cpu"]["profiles"] == ["cpu"]
    assert "deploy" not in SERVICES["worker-cpu"]
    assert "--device" in SERVICES["worker-cpu"]["command"] and SERVICES["worker-cpu"]["command"][-1] == "cpu"


def test_only_optional_services_sit_behind_profiles():
    default = {name for name, service in SERVICES.items() if "profiles" not in service}
    assert default == {"redis", "api", "worker", "prometheus", "grafana"}


def test_dockerfiles_install_the_project_and_match_the_pins():
    for name in ("api", "worker"):
        text = _dockerfile(name)
        assert re.search(r"pip install \.(\s|$)", text), f"{name} image does not `pip install .`"
        assert text.startswith("#"), "each Dockerfile opens with a comment saying what the image is for"
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(p for p in pins if p.startswith("torch==")).split("==")[1]
    assert f"ARG TORCH_VERSION={torch_pin}" in _dockerfile("api")
    assert "python -m workers.models.bundled" in _dockerfile("worker"), "the worker image ships the bundled model"


def test_worker_metrics_port_agrees_across_dockerfile_compose_and_prometheus():
    port = re.search(r"KVC_WORKER_METRICS_PORT=(\d+)", _dockerfile("worker")).group(1)
    assert port in " ".join(SERVICES["worker"]["healthcheck"]["test"])
    worker_job = next(job for job in PROMETHEUS["scrape_configs"] if job["job_name"] == "kvc-worker")
    for sd in worker_job["dns_sd_configs"]:
        assert str(sd["port"]) == port
        assert set(sd["names"]) <= set(SERVICES)


def test_grafana_mounts_provisioning_and_dashboards():
    grafana_volumes = dict(v.split(":")[:2] for v in SERVICES["grafana"]["volumes"] if v.startswith("."))
    assert grafana_volumes["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/kvcompact.yml").read_text())["providers"][0]
    assert grafana_volumes["./deploy/grafana/dashboards"] == provider["options"]["path"]
    home = SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home).parent.as_posix() == provider["options"]["path"] and Path(home).name in DASHBOARDS


# --- prometheus.yml -------------------------------------------------------------------------------------------------
def _targets(job: dict) -> list[str]:
    return [target for group in job.get("static_configs", []) for target in group["targets"]]


def test_prometheus_config_structure():
    """The schema check runs everywhere (promtool is optional): keys, durations, unique jobs, resolvable targets."""
    assert set(PROMETHEUS) <= _PROMETHEUS_TOP
    assert set(PROMETHEUS["global"]) <= _GLOBAL_KEYS
    for key in ("scrape_interval", "evaluation_interval"):
        assert _DURATION.match(PROMETHEUS["global"][key])
    jobs = PROMETHEUS["scrape_configs"]
    assert len({job["job_name"] for job in jobs}) == len(jobs), "job names must be unique"
    for job in jobs:
        assert set(job) <= _SCRAPE_KEYS, f"unknown keys in {job['job_name']}: {set(job) - _SCRAPE_KEYS}"
        assert job.get("metrics_path", "/metrics").startswith("/")
        for target in _targets(job):
            host, _, port = target.rpartition(":")
            assert host and port.isdigit(), target
            assert host in SERVICES or host == "localhost", f"{target} is not a compose service"
        for sd in job.get("dns_sd_configs", []):
            assert sd["type"] in {"A", "AAAA", "SRV", "MX", "NS"}
            assert sd["type"] == "SRV" or isinstance(sd.get("port"), int), "A/AAAA lookups need a port"
            assert _DURATION.match(sd.get("refresh_interval", "30s"))
    api_job = next(job for job in jobs if job["job_name"] == "kvc-api")
    api_port = SERVICES["api"]["command"][SERVICES["api"]["command"].index("--port") + 1]
    assert _targets(api_job) == [f"api:{api_port}"]


def test_prometheus_config_with_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not on PATH (apt-get install prometheus); test_prometheus_config_structure still ran")
    result = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Grafana --------------------------------------------------------------------------------------------------------
def test_datasource_provisioning_matches_dashboards_and_compose():
    sources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    assert [s["uid"] for s in sources] == [DATASOURCE["uid"]]
    assert sources[0]["type"] == DATASOURCE["type"]
    url = urlparse(sources[0]["url"])
    assert url.hostname in SERVICES and str(url.port) in " ".join(SERVICES[url.hostname]["ports"])


def test_dashboards_are_the_generator_output():
    assert {path.name: path.read_text() for path in DASHBOARD_FILES} == build_dashboards.render_all(), \
        "run `python deploy/grafana/build_dashboards.py` and commit its output"


def _overlaps(a: dict, b: dict) -> bool:
    return (a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
            and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"])


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_dashboard_panels(name):
    dashboard = DASHBOARDS[name]
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for i, panel in enumerate(panels):
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24
        assert not any(_overlaps(grid, other["gridPos"]) for other in panels[:i]), f"{panel['title']} overlaps"
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == DATASOURCE["uid"]
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE["uid"] and target["expr"].strip()
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == DATASOURCE["uid"]


def test_dashboard_uids_are_unique():
    uids = [dashboard["uid"] for dashboard in DASHBOARDS.values()]
    assert len(uids) == len(set(uids)) == 4


def test_dashboard_queries_parse_with_promtool(tmp_path):
    """Every panel's PromQL, with Grafana's variables filled in, is accepted by Prometheus' own parser."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not on PATH (apt-get install prometheus); the PromQL tokenizer test still ran")
    substitutions = {"$__rate_interval": "1m", "$__range": "30m", "$model": ".*", "$method": ".*"}
    rules = []
    for dashboard in DASHBOARDS.values():
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"]
                for variable, value in substitutions.items():
                    expr = expr.replace(variable, value)
                assert "$" not in expr, f"unsubstituted variable in {expr}"
                rules.append({"record": f"kvc:dashboard_check_{len(rules)}", "expr": expr})
    rule_file = tmp_path / "dashboards.rules.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(rule_file)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
