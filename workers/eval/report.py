"""Aggregate result records into rows per (dataset, method, keep ratio) and write results.json, results.md and plots."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from statistics import mean

import matplotlib

matplotlib.use("Agg")  # files only: the harness runs headless
import matplotlib.pyplot as plt  # noqa: E402

from workers.eval.methods import RATIO_FREE  # noqa: E402
from workers.eval.scoring import wilson_interval  # noqa: E402

RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
PLOTS = ("accuracy_vs_ratio", "log_ppl_vs_ratio", "accuracy_vs_time")


def _mean(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return mean(present) if present else None


def aggregate(records: list[dict]) -> list[dict]:
    """One row per (dataset, method, keep ratio), in first-seen method order and increasing ratio."""
    groups: dict[tuple[str, str, float], list[dict]] = defaultdict(list)
    method_order: dict[str, int] = {}
    for record in records:
        groups[(record["dataset"], record["method"], record["keep_ratio"])].append(record)
        method_order.setdefault(record["method"], len(method_order))
    rows = []
    ordered = sorted(groups.items(), key=lambda item: (item[0][0], method_order[item[0][1]], item[0][2]))
    for (dataset, method, ratio), group in ordered:
        answers = [q for record in group for q in record["questions"]]
        correct = sum(bool(q["correct"]) for q in answers)
        low, high = wilson_interval(correct, len(answers))
        phases = sorted({phase for record in group for phase in record.get("phase_seconds") or {}})
        rows.append({
            "dataset": dataset, "method": method, "keep_ratio": ratio, "model": group[0].get("model"),
            "dtype": "/".join(sorted({r["dtype"] for r in group if r.get("dtype")})) or None,  # None: not recorded
            "n_docs": len(group), "n_questions": len(answers), "n_correct": correct,
            "accuracy": correct / len(answers) if answers else None, "ci_low": low, "ci_high": high,
            "log_ppl": _mean([q.get("log_ppl") for q in answers]), "kl": _mean([q.get("kl") for q in answers]),
            "compaction_seconds": _mean([r.get("compaction_seconds") for r in group]),
            "phase_seconds": {p: _mean([(r.get("phase_seconds") or {}).get(p) for r in group]) for p in phases},
            "input_tokens": _mean([r.get("input_tokens") for r in group]),
            "retained_slots": _mean([r.get("retained_slots") for r in group]),
            "padded_slots": _mean([r.get("padded_slots") for r in group]),
            "bytes": _mean([r.get("bytes") for r in group]),
        })
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown_table(rows: list[dict]) -> str:
    """One Markdown table per dataset; accuracy carries its 95% Wilson interval."""
    lines: list[str] = []
    for dataset in dict.fromkeys(row["dataset"] for row in rows):
        lines += [f"### {dataset}", "",
                  "| method | keep | questions | accuracy (95% CI) | log-ppl | KL | compaction s | slots | "
                  "padded slots | bytes |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in (r for r in rows if r["dataset"] == dataset):
            accuracy = "n/a" if row["accuracy"] is None else \
                f"{row['accuracy']:.3f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}]"
            lines.append(
                f"| {row['method']} | {row['keep_ratio']:g} | {row['n_questions']} | {accuracy} | "
                f"{_fmt(row['log_ppl'], '.3f')} | {_fmt(row['kl'], '.3f')} | "
                f"{_fmt(row['compaction_seconds'], '.2f')} | "
                f"{_fmt(row['retained_slots'], '.0f')} | {_fmt(row.get('padded_slots'), '.0f')} | "
                f"{_fmt(row['bytes'], '.0f')} |")
        lines.append("")
    return "\n".join(lines)


def ratio_matrix(rows: list[dict]) -> str:
    """Per dataset, methods x keep ratios, each cell `correct/questions, log-ppl`: every method at one budget reads
    down a column, which the long table spreads over many lines."""
    lines: list[str] = []
    for dataset in dict.fromkeys(row["dataset"] for row in rows):
        subset = [r for r in rows if r["dataset"] == dataset]
        ratios = sorted({r["keep_ratio"] for r in subset if r["method"] not in RATIO_FREE}, reverse=True)
        lines += [f"### {dataset}: correct/questions, log-ppl", "",
                  "| method | " + " | ".join(f"keep {ratio:g}" for ratio in ratios) + " |",
                  "|---|" + "---|" * len(ratios)]
        for method, points in _by_method(subset).items():
            by_ratio = {p["keep_ratio"]: p for p in points}
            fixed = points[0] if method in RATIO_FREE else None  # full / none: the same cell at every ratio
            cells = [fixed or by_ratio.get(ratio) for ratio in ratios]
            lines.append(f"| {method} | " + " | ".join(
                "" if cell is None else f"{cell['n_correct']}/{cell['n_questions']}, {_fmt(cell['log_ppl'], '.3f')}"
                for cell in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _by_method(rows: list[dict]) -> dict[str, list[dict]]:
    methods: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        methods[row["method"]].append(row)
    return methods


def _plot_vs_ratio(rows: list[dict], metric: str, label: str, path: Path, title: str) -> None:
    """Metric against keep ratio (log x); ratio-free methods (full, none) are horizontal reference lines."""
    fig, ax = _axes()
    for method, points in _by_method(rows).items():
        points = [p for p in points if p[metric] is not None]
        if not points:
            continue
        if method in RATIO_FREE:
            ax.axhline(points[0][metric], linestyle="--", linewidth=1, color="black" if method == "full" else "grey",
                       label=method)
            continue
        xs = [p["keep_ratio"] for p in points]
        ys = [p[metric] for p in points]
        if metric == "accuracy":
            # Clamped at 0: rows from results.json files written before wilson_interval's clamp can hold a bound a
            # few ulps past the accuracy, and error bars refuse a negative length.
            errors = [[max(0.0, y - p["ci_low"]) for y, p in zip(ys, points)],
                      [max(0.0, p["ci_high"] - y) for y, p in zip(ys, points)]]
            ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=method)
        else:
            ax.plot(xs, ys, marker="o", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("keep ratio (fraction of KV slots kept)")
    ax.set_ylabel(label)
    _finish(fig, ax, title, path)


def _axes():
    """A figure with room on the right for the legend and 20 distinct colours (a combined report can show a dozen
    methods and more: the default 10-colour cycle would repeat)."""
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    return fig, ax


def _finish(fig, ax, title: str, path: Path) -> None:
    """Shared look of every plot (log x axis set by the caller), then write it."""
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_vs_time(rows: list[dict], path: Path, title: str) -> None:
    """Accuracy against compaction seconds per document; each point is labelled with its keep ratio."""
    fig, ax = _axes()
    for method, points in _by_method(rows).items():
        points = [p for p in points if p["accuracy"] is not None and p["compaction_seconds"]]
        if not points:
            continue
        xs, ys = [p["compaction_seconds"] for p in points], [p["accuracy"] for p in points]
        ax.scatter(xs, ys, label=method, s=18)
        for x, y, p in zip(xs, ys, points):
            ax.annotate(f"{p['keep_ratio']:g}", (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("compaction seconds per document (all phases)")
    ax.set_ylabel("accuracy")
    _finish(fig, ax, title, path)


def write_report(rows: list[dict], out_dir: str | Path) -> list[Path]:
    """results.json, results.md and three PNGs per dataset in `out_dir`; returns the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / RESULTS_JSON, out / RESULTS_MD]
    written[0].write_text(json.dumps(rows, indent=1))
    written[1].write_text(markdown_table(rows) + "\n" + ratio_matrix(rows))
    for dataset in dict.fromkeys(row["dataset"] for row in rows):
        subset = [r for r in rows if r["dataset"] == dataset]
        model = subset[0].get("model") or ""
        paths = {name: out / f"{name}_{dataset}.png" for name in PLOTS}
        _plot_vs_ratio(subset, "accuracy", "accuracy", paths["accuracy_vs_ratio"], f"{dataset} ({model}): accuracy")
        _plot_vs_ratio(subset, "log_ppl", "log-perplexity of full-cache answers", paths["log_ppl_vs_ratio"],
                       f"{dataset} ({model}): log-perplexity")
        _plot_vs_time(subset, paths["accuracy_vs_time"], f"{dataset} ({model}): accuracy vs compaction time")
        written += paths.values()
    return written
