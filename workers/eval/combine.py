"""One report from the rows of several runs: `python -m workers.eval.combine OUT SOURCE...`.

Re-running only the methods a change affects (e.g. AM and KVzip after a budget rule changed) leaves the other
methods' rows in an earlier run's results.json; this puts them side by side in one table and one set of plots.
A SOURCE is `results.json` (every row) or `results.json:SELECT,...` where each SELECT is a method name to take, or
`old=new` to take method `old` and label it `new` (an earlier default shown under the override that reproduces it:
`am=am[max_ratio_per_head=0.75]`). Rows are aggregates per (dataset, method, keep ratio), as results.json holds them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from workers.eval.report import write_report


def _split_outside_brackets(text: str, separator: str, limit: int = -1) -> list[str]:
    """`text` split at `separator` where it is not inside [...]: method names carry overrides like `am[a=1,b=2]`."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += (char == "[") - (char == "]")
        if char == separator and depth == 0 and len(parts) != limit:
            parts.append(text[start:index])
            start = index + 1
    return parts + [text[start:]]


def parse_source(source: str) -> tuple[Path, dict[str, str] | None]:
    """(file, {method: label} or None for every row)."""
    path, _, selection = source.partition(":")
    if not selection:
        return Path(path), None
    labels = {}
    for item in _split_outside_brackets(selection, ","):
        old, *new = _split_outside_brackets(item, "=", limit=1)
        labels[old.strip()] = (new[0] if new else old).strip()
    return Path(path), labels


def combined_rows(sources: list[str]) -> list[dict]:
    """The selected rows of every source, relabelled, in source order; a (dataset, method, ratio) given twice is an
    error, since a table cannot show both."""
    rows, seen = [], set()
    for source in sources:
        path, labels = parse_source(source)
        for row in json.loads(path.read_text()):
            if labels is not None and row["method"] not in labels:
                continue
            row = dict(row, method=labels[row["method"]]) if labels else dict(row)
            key = (row["dataset"], row["method"], row["keep_ratio"])
            if key in seen:
                raise ValueError(f"{path}: {key} is already taken from an earlier source")
            seen.add(key)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="directory for results.json, results.md and the plots")
    parser.add_argument("sources", nargs="+", help="results.json or results.json:method,old=new,...")
    args = parser.parse_args(argv)
    for path in write_report(combined_rows(args.sources), args.out):
        print(path)


if __name__ == "__main__":
    main()
