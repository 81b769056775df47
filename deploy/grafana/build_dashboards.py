"""Generate the Grafana dashboards under deploy/grafana/dashboards/ from one description per panel.

Why a generator (as vLLM does with tools/generate_grafana_dashboards.py): the four dashboards share a datasource,
layout and query shapes (percentiles, per-second rates, means of histograms), so describing each panel by its PromQL
keeps the JSON consistent and reviewable. Run `python deploy/grafana/build_dashboards.py` after editing; a test
checks that the committed JSON equals this script's output and that every metric a query uses exists.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DATASOURCE = {"type": "prometheus", "uid": "kvc-prometheus"}  # must match provisioning/datasources/prometheus.yml
OUT_DIR = Path(__file__).resolve().parent / "dashboards"
RATE = "[$__rate_interval]"
TAG = "kvcompact"


# --- PromQL shapes ------------------------------------------------------------------------------------------------
def series(metric: str, selector: str = "") -> str:
    """A series selector: `metric{selector}`, or the bare name when there is nothing to match."""
    return f"{metric}{{{selector}}}" if selector else metric


def rate(metric: str, selector: str = "", by: str = "") -> str:
    """Per-second rate of a counter (or a histogram's _sum/_count), summed by `by` labels."""
    grouping = f" by ({by}) " if by else ""
    return f"sum{grouping}(rate({series(metric, selector)}{RATE}))"


def quantile(q: float, histogram: str, selector: str = "", by: str = "") -> str:
    """The q-quantile of a histogram over the rate interval, as vLLM's latency panels compute it."""
    labels = f"le, {by}" if by else "le"
    return f"histogram_quantile({q}, sum by ({labels}) (rate({series(histogram + '_bucket', selector)}{RATE})))"


def mean(histogram: str, selector: str = "", by: str = "") -> str:
    """Mean observed value of a histogram over the rate interval (rate of _sum over rate of _count)."""
    return f"{rate(histogram + '_sum', selector, by)} / {rate(histogram + '_count', selector, by)}"


def percentiles(histogram: str, selector: str = "", by: str = "") -> list[tuple[str, str]]:
    """p50/p90/p99 targets, one series per `by` group."""
    prefix = "{{" + by + "}} " if by else ""
    return [(quantile(q, histogram, selector, by), f"{prefix}p{int(q * 100)}") for q in (0.5, 0.9, 0.99)]


# --- panels ---------------------------------------------------------------------------------------------------------
@dataclass
class Panel:
    """One Grafana panel: `targets` are (PromQL, legend) pairs; `kind` is a Grafana panel type."""

    title: str
    targets: list[tuple[str, str]]
    unit: str = "short"
    kind: str = "timeseries"
    description: str = ""
    stacked: bool = False
    width: int = 12
    height: int = 8

    def to_json(self, panel_id: int, x: int, y: int) -> dict:
        custom = {"stacking": {"mode": "normal" if self.stacked else "none"}, "fillOpacity": 20 if self.stacked else 5}
        options = {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max", "lastNotNull"]},
                   "tooltip": {"mode": "multi", "sort": "desc"}}
        if self.kind == "stat":
            custom, options = {}, {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                                   "colorMode": "value", "graphMode": "area", "textMode": "auto"}
        elif self.kind == "piechart":
            custom, options = {}, {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                                   "pieType": "donut", "legend": {"displayMode": "table", "placement": "right",
                                                                  "values": ["value", "percent"]}}
        return {
            "id": panel_id,
            "type": self.kind,
            "title": self.title,
            "description": self.description,
            "datasource": DATASOURCE,
            "gridPos": {"h": self.height, "w": self.width, "x": x, "y": y},
            "fieldConfig": {"defaults": {"unit": self.unit, "custom": custom}, "overrides": []},
            "options": options,
            "targets": [
                {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend,
                 "range": True, "instant": False}
                for i, (expr, legend) in enumerate(self.targets)
            ],
        }


@dataclass
class Row:
    """A titled row of panels laid out left to right, wrapping at Grafana's 24 columns."""

    title: str
    panels: list[Panel]


def variable(name: str, metric: str) -> dict:
    """A multi-select template variable over the values of label `name` on `metric` ("All" matches everything)."""
    query = f"label_values({metric}, {name})"
    return {"name": name, "label": name, "type": "query", "datasource": DATASOURCE, "definition": query,
            "query": query, "includeAll": True, "multi": True, "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "refresh": 2, "sort": 1}


def dashboard(uid: str, title: str, description: str, rows: list[Row], variables: Sequence[dict] = ()) -> dict:
    """Lay rows and panels out on the grid and wrap them in a dashboard with stable ids."""
    panels, y, next_id = [], 0, 1
    for row in rows:
        panels.append({"id": next_id, "type": "row", "title": row.title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        next_id, y, x, row_height = next_id + 1, y + 1, 0, 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y, row_height = 0, y + row_height, 0
            panels.append(panel.to_json(next_id, x, y))
            next_id, x, row_height = next_id + 1, x + panel.width, max(row_height, panel.height)
        y += row_height
    return {
        "uid": uid, "title": title, "description": description, "tags": [TAG], "editable": True,
        "schemaVersion": 39, "version": 1, "refresh": "10s", "timezone": "browser", "graphTooltip": 1,
        "time": {"from": "now-30m", "to": "now"},
        "links": [{"type": "dashboards", "tags": [TAG], "asDropdown": True, "title": "kvcompact dashboards"}],
        "annotations": {"list": []},
        "templating": {"list": list(variables)},
        "panels": panels,
    }


# --- the four dashboards --------------------------------------------------------------------------------------------
MODEL = 'model=~"$model"'
MODEL_METHOD = 'model=~"$model", method=~"$method"'


def overview() -> dict:
    """Traffic, errors, latency percentiles and throughput: what vLLM's Overview shows, for this service."""
    requests, server_errors = rate("kvc_http_requests_total"), rate("kvc_http_requests_total", 'status=~"5.."')
    stats = [
        Panel("Requests / s", [(requests, "req/s")], "reqps", "stat", width=6, height=4),
        Panel("Error ratio (5xx)", [(f"({server_errors} or vector(0)) / {requests}", "5xx")], "percentunit", "stat",
              width=6, height=4, description="0 when no 5xx series exists yet, instead of No data."),
        Panel("Workers alive", [("max(kvc_workers_alive)", "workers")], "none", "stat", width=6, height=4),
        Panel("Cached share of prompt tokens", [(f"{rate('kvc_cached_tokens_total', MODEL)} / "
                                                 f"{rate('kvc_prompt_tokens_total', MODEL)}", "cached")],
              "percentunit", "stat", width=6, height=4),
    ]
    traffic = [
        Panel("Requests by route and status", [(rate("kvc_http_requests_total", by="route, status"),
                                                "{{route}} {{status}}")], "reqps", stacked=True),
        Panel("Client and server errors", [(rate("kvc_http_requests_total", 'status=~"4..|5.."', "route, status"),
                                            "{{route}} {{status}}")], "reqps", stacked=True),
        Panel("HTTP latency p95 by route", [(quantile(0.95, "kvc_http_request_duration_seconds", by="route"),
                                             "{{route}}")], "s"),
        Panel("Queue wait", percentiles("kvc_queue_wait_seconds", by="queue"), "s",
              description="Time from enqueue by the API to pick-up by a worker."),
    ]
    chat = [
        Panel("Time to first token", percentiles("kvc_chat_time_to_first_token_seconds", MODEL), "s"),
        Panel("Inter-token latency", percentiles("kvc_chat_inter_token_latency_seconds", MODEL), "s"),
        Panel("End-to-end chat latency", percentiles("kvc_chat_e2e_seconds", MODEL), "s"),
        Panel("Token throughput", [(rate("kvc_prompt_tokens_total", MODEL), "prompt"),
                                   (rate("kvc_cached_tokens_total", MODEL), "cached (compacted prefix)"),
                                   (rate("kvc_completion_tokens_total", MODEL), "completion")], "short",
              description="Tokens per second; cached tokens are the part of the prompt served from a handle."),
    ]
    return dashboard("kvc-overview", "kvcompact / Overview", "Traffic, errors, latency and throughput of the API.",
                     [Row("Summary", stats), Row("Traffic and errors", traffic), Row("Chat", chat)],
                     [variable("model", "kvc_chat_e2e_seconds_count")])


def compaction() -> dict:
    """Ratio, phase breakdown and bytes saved versus keeping the full KV cache."""
    saved = (f"sum(increase(kvc_full_kv_bytes_sum{{{MODEL_METHOD}}}[$__range])) - "
             f"sum(increase(kvc_blob_bytes_sum{{{MODEL_METHOD}}}[$__range]))")
    stats = [
        Panel("Compactions in range", [(f"sum(increase(kvc_compaction_seconds_count{{{MODEL_METHOD}}}[$__range]))",
                                        "compactions")], "none", "stat", width=6, height=4),
        Panel("Mean ratio", [(mean("kvc_compaction_ratio", MODEL_METHOD), "ratio")], "none", "stat", width=6,
              height=4, description="usage.compaction_ratio averaged over compactions in the rate interval."),
        Panel("Bytes saved in range", [(saved, "saved")], "bytes", "stat", width=6, height=4,
              description="Full KV bytes the compacted contexts would have taken, minus the blobs stored."),
        Panel("Full KV / blob size", [(f"sum(increase(kvc_full_kv_bytes_sum{{{MODEL_METHOD}}}[$__range])) / "
                                       f"sum(increase(kvc_blob_bytes_sum{{{MODEL_METHOD}}}[$__range]))", "x")],
              "none", "stat", width=6, height=4),
    ]
    speed = [
        Panel("Compactions / s by method", [(rate("kvc_compaction_seconds_count", MODEL_METHOD, "method"),
                                             "{{method}}")], "ops", stacked=True),
        Panel("Compaction duration by method", percentiles("kvc_compaction_seconds", MODEL_METHOD, "method"), "s"),
        Panel("Mean time per phase", [(mean("kvc_compaction_phase_seconds", MODEL_METHOD, "phase"), "{{phase}}")],
              "s", stacked=True, description="Stacked: the mean compaction broken into its phases."),
        Panel("Share of compaction time by phase",
              [(f"sum by (phase) (increase(kvc_compaction_phase_seconds_sum{{{MODEL_METHOD}}}[$__range]))",
                "{{phase}}")], "s", "piechart"),
    ]
    ratio = [
        Panel("Achieved ratio by method", [(mean("kvc_compaction_ratio", MODEL_METHOD, "method"), "{{method}}")]),
        Panel("Mean input tokens and retained KV slots",
              [(mean("kvc_compaction_input_tokens", MODEL_METHOD), "input tokens"),
               (mean("kvc_compaction_retained_slots", MODEL_METHOD), "retained slots")],
              description="Retained slots count every (layer, KV head) slot kept, so they are not tokens: the ratio "
                          "panel divides the full slot count (tokens x layers x KV heads) by them."),
        Panel("Bytes / s: full KV vs stored blob", [(rate("kvc_full_kv_bytes_sum", MODEL_METHOD), "full KV"),
                                                    (rate("kvc_blob_bytes_sum", MODEL_METHOD), "blob"),
                                                    (f"{rate('kvc_full_kv_bytes_sum', MODEL_METHOD)} - "
                                                     f"{rate('kvc_blob_bytes_sum', MODEL_METHOD)}", "saved")],
              "Bps"),
        Panel("Blob size", percentiles("kvc_blob_bytes", MODEL_METHOD), "bytes"),
    ]
    return dashboard("kvc-compaction", "kvcompact / Compaction", "What Attention Matching compaction costs and saves.",
                     [Row("Summary", stats), Row("Speed and phases", speed), Row("Ratio and size", ratio)],
                     [variable("model", "kvc_compaction_seconds_count"),
                      variable("method", "kvc_compaction_seconds_count")])


def workers() -> dict:
    """Queue depth and lag, worker utilisation, job outcomes, device memory and the hot cache."""
    hits, misses = rate("kvc_hot_cache_hits_total"), rate("kvc_hot_cache_misses_total")
    stats = [
        Panel("Workers alive", [("max(kvc_workers_alive)", "workers")], "none", "stat", width=6, height=4),
        Panel("Busy workers", [("sum(kvc_worker_busy)", "busy")], "none", "stat", width=6, height=4),
        Panel("Pending jobs", [("sum(max by (stream) (kvc_stream_pending_jobs))", "pending")], "none", "stat", width=6,
              height=4),
        Panel("Hot-cache hit ratio", [(f"{hits} / ({hits} + {misses})", "hit ratio")], "percentunit", "stat",
              width=6, height=4),
    ]
    queue = [
        Panel("Pending jobs by stream", [("max by (stream) (kvc_stream_pending_jobs)", "{{stream}}")], "none",
              description="Delivered to a worker but not yet acknowledged (XPENDING). Max: several processes report."),
        Panel("Stream lag", [("max by (stream) (kvc_stream_lag)", "{{stream}}")], "none",
              description="Entries not yet delivered to any worker of the consumer group."),
        Panel("Queue wait", percentiles("kvc_queue_wait_seconds", by="queue"), "s"),
        Panel("Jobs / s by kind and outcome", [(rate("kvc_jobs_total", by="kind, outcome"), "{{kind}} {{outcome}}"),
                                               (rate("kvc_jobs_reclaimed_total", by="kind"),
                                                "{{kind}} reclaimed")], "ops", stacked=True,
              description="Reclaimed: jobs of a dead worker taken over through XAUTOCLAIM."),
    ]
    worker_rows = [
        Panel("Worker utilisation", [("avg_over_time(kvc_worker_busy[$__rate_interval])", "{{worker}}")],
              "percentunit", description="Share of scrapes at which each worker was running a job."),
        Panel("Device memory in use", [("sum by (instance, device) (kvc_device_memory_bytes)",
                                        "{{instance}} {{device}}")], "bytes"),
        Panel("Hot cache", [(hits, "hits"), (misses, "misses"), (rate("kvc_hot_cache_evictions_total"), "evictions")],
              "ops"),
    ]
    return dashboard("kvc-workers", "kvcompact / Workers and queue", "Redis Streams queues and the GPU workers.",
                     [Row("Summary", stats), Row("Queue", queue), Row("Workers", worker_rows)])


def redis_store() -> dict:
    """Redis call rate, latency and errors, plus what the blob store writes."""
    errors = rate("kvc_redis_errors_total")
    stats = [
        Panel("Redis ops / s", [(rate("kvc_redis_op_seconds_count"), "ops")], "ops", "stat", width=6, height=4),
        Panel("Redis errors / s", [(errors, "errors")], "ops", "stat", width=6, height=4),
        Panel("Redis p99 latency", [(quantile(0.99, "kvc_redis_op_seconds"), "p99")], "s", "stat", width=6,
              height=4),
        Panel("Blob bytes written / s", [(rate("kvc_blob_bytes_sum"), "bytes")], "Bps", "stat", width=6, height=4),
    ]
    ops = [
        Panel("Operations / s by op", [(rate("kvc_redis_op_seconds_count", by="op"), "{{op}}")], "ops",
              stacked=True),
        Panel("Latency p99 by op", [(quantile(0.99, "kvc_redis_op_seconds", by="op"), "{{op}}")], "s"),
        Panel("Latency p50 by op", [(quantile(0.5, "kvc_redis_op_seconds", by="op"), "{{op}}")], "s"),
        Panel("Errors / s by op", [(rate("kvc_redis_errors_total", by="op"), "{{op}}")], "ops", stacked=True),
    ]
    blobs = [
        Panel("Blobs stored / s by model", [(rate("kvc_blob_bytes_count", by="model"), "{{model}}")], "ops"),
        Panel("Mean blob size by method", [(mean("kvc_blob_bytes", by="method"), "{{method}}")], "bytes"),
    ]
    return dashboard("kvc-redis", "kvcompact / Redis store", "Latency and errors of every Redis call; blob writes.",
                     [Row("Summary", stats), Row("Operations", ops), Row("Blobs", blobs)])


DASHBOARDS = {"overview": overview, "compaction": compaction, "workers": workers, "redis": redis_store}


def render_all() -> dict[str, str]:
    """File name -> JSON text of every dashboard, exactly as committed."""
    return {f"kvc-{name}.json": json.dumps(build(), indent=2) + "\n" for name, build in DASHBOARDS.items()}


def main() -> int:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name, text in render_all().items():
        (OUT_DIR / name).write_text(text)
        print(f"wrote {OUT_DIR / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
