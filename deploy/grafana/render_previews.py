"""Render each dashboard's panels from a live Prometheus into a PNG, for hosts where Grafana itself cannot run.

Grafana is not packaged by Debian, PyPI or npm, so the development machines cannot render the dashboards (see
docs/observability.md). This script runs every panel's PromQL, with Grafana's variables filled in, through the
Prometheus HTTP API (`query_range` for graphs, `query` for stats and pies) and draws the result on the dashboard's
own grid with matplotlib. The queries and layout are those of the JSON; only the drawing is not Grafana's.

    python deploy/grafana/render_previews.py --prometheus http://127.0.0.1:9090 --minutes 20 --out docs
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

DASHBOARD_DIR = Path(__file__).resolve().parent / "dashboards"
GRID_COLUMNS = 24
_LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_UNIT_SCALE = {"bytes": (1024.0, ["B", "KiB", "MiB", "GiB", "TiB"]),
               "Bps": (1024.0, ["B/s", "KiB/s", "MiB/s", "GiB/s"])}


class Prometheus:
    """The two Prometheus HTTP API calls the panels need."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def _get(self, path: str, **params: str | float) -> list[dict]:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=30) as response:
            body = json.load(response)
        if body["status"] != "success":
            raise RuntimeError(f"{params.get('query')}: {body}")
        return body["data"]["result"]

    def range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        return self._get("/api/v1/query_range", query=expr, start=start, end=end, step=step)

    def instant(self, expr: str, at: float) -> list[dict]:
        return self._get("/api/v1/query", query=expr, time=at)


def substitute(expr: str, rate_interval_s: int, range_s: int) -> str:
    """Fill in Grafana's built-in and template variables the way Grafana would with "All" selected."""
    for variable, value in (("$__rate_interval", f"{rate_interval_s}s"), ("$__range", f"{range_s}s"),
                            ("$model", ".*"), ("$method", ".*")):
        expr = expr.replace(variable, value)
    return expr


def legend(fmt: str, labels: dict[str, str]) -> str:
    return _LEGEND_LABEL.sub(lambda m: labels.get(m.group(1), ""), fmt).strip() or "value"


def last_value(points: list[list]) -> float:
    """The last point that is a number (Prometheus returns "NaN" for 0/0, e.g. a ratio over an idle interval)."""
    numbers = [float(v) for _, v in points if not math.isnan(float(v))]
    return numbers[-1] if numbers else math.nan


def human(value: float, unit: str) -> str:
    """A stat value with Grafana's unit formatting, roughly."""
    if math.isnan(value):
        return "NaN"
    if unit == "percentunit":
        return f"{value * 100:.1f}%"
    if unit in _UNIT_SCALE:
        base, names = _UNIT_SCALE[unit]
        power = min(int(math.log(abs(value), base)) if abs(value) >= 1 else 0, len(names) - 1)
        return f"{value / base ** power:.1f} {names[power]}"
    suffix = {"s": " s", "reqps": " req/s", "ops": " ops/s"}.get(unit, "")
    return f"{value:.3g}{suffix}"


def draw_panel(ax: plt.Axes, panel: dict, prom: Prometheus, start: float, end: float, step: float,
               rate_interval_s: int) -> None:
    unit = panel["fieldConfig"]["defaults"].get("unit", "short")
    ax.set_title(panel["title"], fontsize=9, loc="left")
    queries = [(substitute(t["expr"], rate_interval_s, int(end - start)), t["legendFormat"]) for t in panel["targets"]]
    if panel["type"] == "timeseries":
        for expr, fmt in queries:
            for series in prom.range(expr, start, end, step):
                times = [(float(t) - end) / 60 for t, _ in series["values"]]
                ax.plot(times, [float(v) for _, v in series["values"]], label=legend(fmt, series["metric"]),
                        linewidth=1.2)
        ax.set_xlim((start - end) / 60, 0)
        ax.set_xlabel("minutes", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.set_ylabel(unit, fontsize=7)
        if ax.lines:
            ax.legend(fontsize=6, loc="upper left", ncol=2, frameon=False)
        else:
            ax.text(0.5, 0.5, "No data", ha="center", va="center", transform=ax.transAxes, color="grey")
        return
    ax.axis("off")
    if panel["type"] == "piechart":
        values = [(legend(fmt, s["metric"]), float(s["value"][1])) for expr, fmt in queries
                  for s in prom.instant(expr, end)]
    else:  # a stat shows the last non-null value of its range query ("lastNotNull"), as Grafana does
        values = [(legend(fmt, s["metric"]), last_value(s["values"])) for expr, fmt in queries
                  for s in prom.range(expr, start, end, step)]
    if panel["type"] == "piechart" and values and sum(v for _, v in values) > 0:
        ax.pie([v for _, v in values], labels=[f"{name} {human(v, unit)}" for name, v in values],
               textprops={"fontsize": 7}, wedgeprops={"width": 0.45})
    else:
        text = "\n".join(human(v, unit) for _, v in values) or "No data"
        ax.text(0.5, 0.4, text, ha="center", va="center", fontsize=18 if len(values) <= 1 else 10,
                transform=ax.transAxes, color="#1f6fb2" if values else "grey")


def render(dashboard: dict, prom: Prometheus, minutes: float, out: Path) -> Path:
    """Draw one dashboard's panels on its grid; rows become section headings."""
    end = time.time()
    start, step = end - minutes * 60, max(5.0, minutes * 60 / 240)
    rate_interval_s = int(max(4 * 5, 4 * step))  # Grafana: at least four scrape intervals
    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = plt.figure(figsize=(20, rows * 0.55))
    grid = fig.add_gridspec(rows, GRID_COLUMNS, hspace=2.5, wspace=1.2, top=0.96, bottom=0.03, left=0.04, right=0.99)
    for panel in panels:
        pos = panel["gridPos"]
        ax = fig.add_subplot(grid[pos["y"]:pos["y"] + pos["h"], pos["x"]:pos["x"] + pos["w"]])
        if panel["type"] == "row":
            ax.axis("off")
            ax.text(0, 0.5, panel["title"], fontsize=12, fontweight="bold", transform=ax.transAxes)
            continue
        draw_panel(ax, panel, prom, start, end, step, rate_interval_s)
    fig.suptitle(f"{dashboard['title']}: last {minutes:g} min (panel queries via Prometheus; drawn with "
                 "matplotlib, not Grafana)", fontsize=13, x=0.04, y=0.995, ha="left")
    path = out / f"dashboard-{dashboard['uid']}.png"
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--minutes", type=float, default=20.0, help="time range drawn, ending now")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    prom = Prometheus(args.prometheus)
    for path in sorted(DASHBOARD_DIR.glob("*.json")):
        print(render(json.loads(path.read_text()), prom, args.minutes, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
