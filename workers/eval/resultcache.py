"""Per-(dataset, document, method, keep ratio) result files under OUT/cache/: what makes an eval run resumable.

A record is a JSON object: dataset, doc_id, method, keep_ratio, model, input_tokens, retained_slots, bytes,
compaction_seconds, phase_seconds, and `questions` (index, prediction, reference, correct, log_ppl, kl), one entry per
question asked. Files are written atomically, so an interrupted run leaves either a whole record or none. Standard
library only: the kvpress side script writes records with this module too.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from urllib.parse import quote

CACHE_DIR = "cache"


def slug(text: str) -> str:
    """A file-name-safe label (model sources can be paths)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip("/")).strip("_") or "model"


class ResultStore:
    """Result records of one model (or endpoint) under OUT/cache/<label>/<dataset>/<doc id>/<method>@<ratio>.json."""

    def __init__(self, out_dir: str | Path, label: str) -> None:
        self.out_dir, self.label = Path(out_dir), label
        self.root = self.out_dir / CACHE_DIR / slug(label)

    def path(self, dataset: str, doc_id: str, method: str, keep_ratio: float) -> Path:
        name = f"{quote(method, safe='')}@{keep_ratio:g}.json"
        return self.root / slug(dataset) / quote(doc_id, safe="") / name

    def load(self, dataset: str, doc_id: str, method: str, keep_ratio: float, n_questions: int) -> dict | None:
        """The cached record if it answers at least `n_questions` questions (trimmed to them), else None."""
        path = self.path(dataset, doc_id, method, keep_ratio)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None  # a foreign or damaged file: recompute and overwrite it
        if len(record.get("questions", [])) < n_questions:
            return None
        return {**record, "questions": record["questions"][:n_questions]}

    def save(self, record: dict) -> dict:
        """Store a record (labelled with this store's model) and return it as stored."""
        record = {**record, "model": self.label}
        path = self.path(record["dataset"], record["doc_id"], record["method"], record["keep_ratio"])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)
        return record
