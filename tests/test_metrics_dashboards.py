"""Every metric a Grafana panel queries is defined in workers/metrics.py and really exported by a running service.

The metric names come from the dashboards' PromQL through a small tokenizer (below), so a renamed metric or a
typo in a panel fails here instead of showing "No data" in Grafana. Names are compared with the *sample* names of
a scrape (`kvc_x_total`, `kvc_y_bucket`, ...), which also catches `_bucket` on a counter or a missing `_total`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from tests.service_helpers import DOCUMENT, Service, chat, compact, free_port, wait_until
from workers import metrics

DASHBOARD_DIR = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dashboards"

# PromQL aggregation operators and functions (Prometheus 2.x/3.x). An identifier followed by "(" must be one of
# these: a typo in a function name fails instead of being mistaken for a metric.
AGGREGATIONS = frozenset("sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk "
                         "limit_ratio".split())
PROMQL_FUNCTIONS = AGGREGATIONS | frozenset("""
abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes clamp clamp_max clamp_min
cos cosh count_over_time day_of_month day_of_week day_of_year days_in_month deg delta deriv exp floor
histogram_avg histogram_count histogram_fraction histogram_quantile histogram_stddev histogram_stdvar histogram_sum
holt_winters double_exponential_smoothing hour idelta increase info irate label_join label_replace last_over_time ln
log10 log2 mad_over_time max_over_time min_over_time minute month pi predict_linear present_over_time
quantile_over_time rad rate resets round scalar sgn sin sinh sort sort_by_label sort_by_label_desc sort_desc sqrt
stddev_over_time stdvar_over_time sum_over_time tan tanh time timestamp vector year
""".split())
PROMQL_KEYWORDS = frozenset("and or unless bool offset atan2 inf nan".split())
GROUPING_KEYWORDS = frozenset("by without on ignoring group_left group_right".split())

_TOKEN = re.compile(r"""
    (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<range>\[[^\]]*\])                          # [5m], [$__rate_interval], subqueries [1h:5m]
  | (?P<variable>\$\{?\w+\}?)                      # Grafana variables outside ranges
  | (?P<duration>\d+(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*\b)
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<open>[({])
  | (?P<close>[)}])
  | (?P<other>[,=!~<>+\-*/%^@]+|\s+)
""", re.VERBOSE)
_LABEL_VALUES = re.compile(r"^label_values\(\s*(?:(?P<metric>[^,()]+?)\s*,)?\s*(?P<label>\w+)\s*\)$")


def tokenize(expr: str) -> list[tuple[str, str]]:
    """(kind, text) tokens of a PromQL expression, whitespace dropped; raises on a character PromQL does not use."""
    tokens, pos = [], 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None:
            raise ValueError(f"cannot tokenize {expr[pos:]!r} in {expr!r}")
        if not match.group().isspace():
            tokens.append((match.lastgroup, match.group()))
        pos = match.end()
    return tokens


def _skip_group(tokens: list[tuple[str, str]], start: int) -> int:
    """Index just past the bracket group that opens at `start` (label matchers or a grouping label list)."""
    depth = 0
    for i in range(start, len(tokens)):
        depth += {"open": 1, "close": -1}.get(tokens[i][0], 0)
        if depth == 0:
            return i + 1
    raise ValueError("unbalanced brackets")


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, keywords or label names."""
    tokens, names, i = tokenize(expr), set(), 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if text == "{":
            i = _skip_group(tokens, i)  # label names and values inside matchers
            continue
        if kind == "ident" and text in GROUPING_KEYWORDS:
            i = _skip_group(tokens, i + 1) if following == "(" else i + 1
            continue
        if kind == "ident" and text in AGGREGATIONS and following in {"by", "without"}:
            pass  # `sum by (x) (...)`: the grouping clause comes before the argument
        elif kind == "ident" and following == "(":
            assert text in PROMQL_FUNCTIONS, f"unknown PromQL function {text!r} in {expr!r}"
        elif kind == "ident" and text.lower() not in PROMQL_KEYWORDS:
            names.add(text)
        i += 1
    return names


def _dashboards() -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARD_DIR.glob("*.json"))}


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every templating variable of every dashboard."""
    queries = []
    for name, dashboard in _dashboards().items():
        for panel in dashboard["panels"]:
            queries += [(f"{name}: {panel['title']}", target["expr"]) for target in panel.get("targets", [])]
        for variable in dashboard["templating"]["list"]:
            match = _LABEL_VALUES.match(variable["query"])
            assert match, f"{name}: variable {variable['name']} is not a label_values() query"
            if match["metric"]:
                queries.append((f"{name}: ${variable['name']}", match["metric"]))
    return queries


def dashboard_metric_names() -> dict[str, set[str]]:
    """Metric name -> the panels that use it."""
    used: dict[str, set[str]] = {}
    for where, expr in dashboard_queries():
        for name in metric_names(expr):
            used.setdefault(name, set()).add(where)
    return used


def defined_sample_names() -> set[str]:
    """Sample names the metrics of workers/metrics.py can expose, derived from each metric's type."""
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
                "summary": ("_sum", "_count", "")}
    names = set()
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            for family in metric.describe():
                names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


def scraped_samples(text: str) -> dict[str, float]:
    """Sample name -> sum of its values over all label sets, from a Prometheus text exposition."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


# --- the tokenizer itself ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("expr", "expected"), [
    ('sum by (route, status) (rate(kvc_http_requests_total{status=~"5.."}[$__rate_interval]))',
     {"kvc_http_requests_total"}),
    ("histogram_quantile(0.99, sum by (le, op) (rate(kvc_redis_op_seconds_bucket[5m])))",
     {"kvc_redis_op_seconds_bucket"}),
    ("a_total / ignoring(phase) group_left sum without (x) (b_sum offset 1h)", {"a_total", "b_sum"}),
    ('label_replace(up{job="api"}, "dst", "$1", "src", "(.*)") > bool 0.5e3', {"up"}),
    ("max_over_time(kvc_workers_alive[1h:5m]) or on() vector(0)", {"kvc_workers_alive"}),
    ('{__name__="kvc_x"} * 2', set()),
])
def test_tokenizer_finds_metric_names(expr, expected):
    assert metric_names(expr) == expected


def test_tokenizer_refuses_unknown_functions():
    with pytest.raises(AssertionError, match="unknown PromQL function"):
        metric_names("histogram_quantil(0.5, rate(kvc_chat_e2e_seconds_bucket[1m]))")


# --- dashboards vs workers/metrics.py ---------------------------------------------------------------------------------
def test_dashboards_use_only_metrics_defined_in_workers_metrics():
    used = dashboard_metric_names()
    assert len(used) >= 20, "the dashboards should cover the service's metrics"
    missing = {name: sorted(where) for name, where in used.items() if name not in defined_sample_names()}
    assert not missing, f"panels query metrics workers/metrics.py does not define: {missing}"


def test_every_defined_metric_appears_on_some_dashboard():
    """A metric nobody can see is either dead code or a missing panel."""
    used = {re.sub(r"_(bucket|sum|count|total)$", "", name) for name in dashboard_metric_names()}
    defined = {family.name for metric in vars(metrics).values() if isinstance(metric, MetricWrapperBase)
               for family in metric.describe()}
    assert defined <= used, f"metrics on no dashboard: {sorted(defined - used)}"


# --- dashboards vs a real scrape ---------------------------------------------------------------------------------------
# What one compaction plus a few chats must have moved, beyond merely existing: proof each instrumentation point runs.
EXERCISED = (
    "kvc_http_requests_total", "kvc_http_request_duration_seconds_count", "kvc_chat_time_to_first_token_seconds_count",
    "kvc_chat_inter_token_latency_seconds_count", "kvc_chat_e2e_seconds_count", "kvc_prompt_tokens_total",
    "kvc_cached_tokens_total", "kvc_completion_tokens_total", "kvc_queue_wait_seconds_count", "kvc_jobs_total",
    "kvc_compaction_phase_seconds_count", "kvc_compaction_seconds_count", "kvc_compaction_input_tokens_sum",
    "kvc_compaction_retained_slots_sum", "kvc_compaction_ratio_sum", "kvc_blob_bytes_sum", "kvc_full_kv_bytes_sum",
    "kvc_redis_op_seconds_count", "kvc_hot_cache_hits_total", "kvc_device_memory_bytes", "kvc_workers_alive",
)


@pytest.fixture(scope="module")
def live_scrape(tmp_path_factory) -> dict[str, str]:
    """Run the API and a worker as docker-compose does (each with its own /metrics), drive them with the openai
    client, and return both scrapes: {"api": text, "worker": text}."""
    worker_port = free_port()
    service = Service(tmp_path_factory.mktemp("svc-metrics"), {"KVC_WORKER_METRICS_PORT": str(worker_port)})
    try:
        service.start(workers=1)
        client = service.client(max_retries=0)
        token = compact(client, DOCUMENT, keep_ratio=0.5)["encrypted_content"]
        chat(client, token, "What is the code?", max_tokens=6)
        list(chat(client, token, "Where is the locker?", max_tokens=6, stream=True,
                  stream_options={"include_usage": True}))
        with pytest.raises(openai.NotFoundError):
            chat(client, "kvc1.unknown", "q")
        service.live_workers()  # /ready publishes kvc_workers_alive
        worker_url = f"http://127.0.0.1:{worker_port}/metrics"
        # The worker publishes queue and device gauges on its heartbeat; wait for one after the jobs.
        wait_until(lambda: "kvc_device_memory_bytes{" in httpx.get(worker_url, timeout=5).text, 30, "worker gauges")
        return {"api": httpx.get(f"{service.base_url}/metrics", timeout=10).text,
                "worker": httpx.get(worker_url, timeout=10).text}
    finally:
        service.close()


def test_every_dashboard_metric_is_in_a_live_scrape(live_scrape):
    scraped = {**scraped_samples(live_scrape["api"]), **scraped_samples(live_scrape["worker"])}
    missing = {name: sorted(where) for name, where in dashboard_metric_names().items() if name not in scraped}
    assert not missing, f"dashboard panels query metrics the running service does not export: {missing}"


def test_a_compaction_and_a_chat_move_every_instrumented_metric(live_scrape):
    api, worker = scraped_samples(live_scrape["api"]), scraped_samples(live_scrape["worker"])
    idle = [name for name in EXERCISED if not (api.get(name, 0) or worker.get(name, 0))]
    assert not idle, f"metrics never recorded during a compaction and chats: {idle}"


def test_compaction_phases_are_all_recorded(live_scrape):
    phases = {sample.labels["phase"] for family in text_string_to_metric_families(live_scrape["worker"])
              if family.name == "kvc_compaction_phase_seconds" for sample in family.samples
              if sample.name.endswith("_count") and sample.value > 0}
    assert set(metrics.COMPACTION_PHASES) <= phases, "the AM compaction did not report every phase"
