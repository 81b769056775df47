"""Read eval datasets: JSONL, one document per line, in the format of `shared/data/README.md`.

Any file in that format drops in, so every line is validated and a malformed one names its file, line and field
instead of failing later in the middle of a long run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

OPEN_METRICS = ("string_match_all", "string_match_part")
MULTIPLE_CHOICE = "multiple_choice"


class DatasetError(ValueError):
    """A dataset line does not follow the expected format."""


@dataclass(frozen=True)
class Question:
    """One question about a document: multiple choice (options + answer_index) or open (gold answers + metric)."""

    question: str
    options: tuple[str, ...] = ()
    answer_index: int | None = None
    answers: tuple[str, ...] = ()
    metric: str = MULTIPLE_CHOICE

    @property
    def is_multiple_choice(self) -> bool:
        return self.metric == MULTIPLE_CHOICE


@dataclass(frozen=True)
class Document:
    """A context to compact once and the questions asked about it; `extra` keeps the line's other keys (task, ...)."""

    id: str
    context: str
    questions: tuple[Question, ...]
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def task(self) -> str:
        return str(self.extra.get("task", ""))


def dataset_name(path: str | Path) -> str:
    """The name a dataset's rows carry: its file name without extension."""
    return Path(path).name.split(".")[0]


def _require(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise DatasetError(f"{where}: {message}")


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def parse_question(raw: object, where: str) -> Question:
    """Validate one question object; multiple choice when it has options, open-ended otherwise."""
    _require(isinstance(raw, dict), where, "a question must be a JSON object")
    assert isinstance(raw, dict)
    text = raw.get("question")
    _require(isinstance(text, str) and bool(text.strip()), where, "'question' must be a non-empty string")
    options = raw.get("options", [])
    _require(_is_str_list(options), where, "'options' must be a list of strings")
    if options:
        index = raw.get("answer_index")
        _require(len(options) >= 2, where, "a multiple-choice question needs at least 2 options")
        _require(len(options) <= 26, where, "at most 26 options (letters A-Z)")
        _require(
            isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(options),
            where,
            f"'answer_index' must be an int in [0, {len(options)}) for a multiple-choice question, got {index!r}",
        )
        return Question(question=text, options=tuple(options), answer_index=index)
    answers = raw.get("answers")
    _require(_is_str_list(answers) and bool(answers), where, "an open question needs a non-empty 'answers' list")
    _require(all(a.strip() for a in answers), where, "gold answers must be non-empty strings")
    metric = raw.get("metric")
    _require(metric in OPEN_METRICS, where, f"'metric' must be one of {OPEN_METRICS}, got {metric!r}")
    return Question(question=text, answers=tuple(answers), metric=metric)


def parse_document(line: str, where: str) -> Document:
    """Validate one JSONL line into a Document."""
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
    _require(isinstance(raw, dict), where, "a line must be a JSON object")
    doc_id = raw.get("id")
    _require(isinstance(doc_id, str) and bool(doc_id), where, "'id' must be a non-empty string")
    where = f"{where} (id {doc_id})"
    context = raw.get("context")
    _require(isinstance(context, str) and bool(context.strip()), where, "'context' must be a non-empty string")
    questions = raw.get("questions")
    _require(isinstance(questions, list) and bool(questions), where, "'questions' must be a non-empty list")
    parsed = tuple(parse_question(q, f"{where} question {i}") for i, q in enumerate(questions))
    extra = {k: v for k, v in raw.items() if k not in ("id", "context", "questions")}
    return Document(id=doc_id, context=context, questions=parsed, extra=extra)


def load_dataset(path: str | Path, limit: int | None = None) -> list[Document]:
    """All documents of a JSONL file (the first `limit` if given); blank lines are skipped, ids must be unique."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    documents: list[Document] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if limit is not None and len(documents) >= limit:
                break
            if not line.strip():
                continue
            doc = parse_document(line, f"{path}:{number}")
            _require(doc.id not in seen, f"{path}:{number}", f"duplicate document id {doc.id!r}")
            seen.add(doc.id)
            documents.append(doc)
    if not documents:
        raise DatasetError(f"{path}: no documents")
    return documents


def parse_shard(text: str) -> tuple[int, int] | None:
    """`I/N` -> (I, N) when 0 <= I < N, else None: the process that takes documents I, I+N, I+2N, ... of a set."""
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit()) or not 0 <= int(index) < int(count):
        return None
    return int(index), int(count)
