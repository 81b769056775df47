"""Eval methods: how each one builds the context cache a question is asked from, at a given keep ratio.

A method name is one of
  `full` (the whole uncompacted cache), `none` (no document: the question alone, what the model knows without the context),
  a core compaction method (`am`, `am-omp`, `truncate`, `kvzip`, ...), optionally with CompactionConfig overrides in
  brackets (`am[budget=uniform]`, `am[query_sources=repeat+self-study,on_policy=true]`; `+` separates list items),
  `summary` (the model summarises the document in at most keep_ratio x its tokens; the summary's full cache is the
  context), or `summary+<compaction method>` (a summary of SUMMARY_HEADROOM x the budget, compacted down to the budget).
The override `hints=@questions` passes the document's own question prompts as compaction hints (what a caller that
knows its questions would send; not question-agnostic, so such rows measure the hints, not a baseline).
Everything goes through a Backend (in-process core API or the HTTP service), so both paths run the same methods.
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from workers.eval.prompts import SUMMARY_PROMPT

if TYPE_CHECKING:  # methods stay importable without torch (report.py uses RATIO_FREE)
    from workers.eval.backends import Backend, BuiltContext

FULL, NONE, SUMMARY = "full", "none", "summary"
COMPACTION, SUMMARY_COMPACTION = "compaction", "summary+compaction"  # kinds of the other method names
SUMMARY_PREFIX = "summary+"
# summary+X: the summary may use this many times the slot budget; X then compacts it 4x, a ratio AM handles well.
SUMMARY_HEADROOM = 4
# Keep-ratio recorded for methods that do not depend on the ratio: they are computed once per document.
RATIO_FREE = {FULL: 1.0, NONE: 0.0}
EMPTY_SUMMARY = "(empty summary)"
# Fields the harness sets itself; an override would silently change the budget being compared.
RESERVED_FIELDS = {"method", "keep_ratio", "target_tokens"}
# The `hints` override value that stands for the evaluated questions' prompts (bound per document: with_questions).
QUESTION_HINTS = "@questions"

_SPEC = re.compile(r"^(?P<base>[A-Za-z0-9_+\-]+)(?:\[(?P<args>[^\[\]]*)\])?$")


class MethodError(ValueError):
    """A method name that cannot be parsed or configured."""


@dataclass(frozen=True)
class MethodSpec:
    """A parsed method name; `overrides` are raw strings until coerce_overrides types them."""

    name: str
    kind: str  # FULL | NONE | SUMMARY | COMPACTION | SUMMARY_COMPACTION
    core_method: str | None = None
    overrides: tuple[tuple[str, str], ...] = ()
    question_hints: tuple[str, ...] = ()  # what `hints=@questions` stands for once bound to a document

    @property
    def hints_questions(self) -> bool:
        """Whether this method's hints are the evaluated questions (`hints=@questions`)."""
        return ("hints", QUESTION_HINTS) in self.overrides

    def with_questions(self, prompts: tuple[str, ...]) -> MethodSpec:
        """This spec bound to one document's question prompts (unchanged unless it asks for them as hints)."""
        return dataclasses.replace(self, question_hints=prompts) if self.hints_questions else self

    @property
    def uses_ratio(self) -> bool:
        return self.kind not in RATIO_FREE

    def keep_ratios(self, ratios: list[float]) -> list[float]:
        """The ratios this method is evaluated at: all of them, or its one fixed value."""
        return list(ratios) if self.uses_ratio else [RATIO_FREE[self.kind]]


def _parse_overrides(args: str | None, name: str) -> tuple[tuple[str, str], ...]:
    if not args:
        return ()
    pairs = []
    for item in args.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise MethodError(f"method {name!r}: expected key=value inside the brackets, got {item!r}")
        if key.strip() in RESERVED_FIELDS:
            raise MethodError(f"method {name!r}: {key.strip()!r} is set by the harness and cannot be overridden")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


def parse_method(name: str) -> MethodSpec:
    """Parse `base[key=value,...]` into a MethodSpec (no check against the core yet: see coerce_overrides)."""
    match = _SPEC.match(name.strip())
    if not match:
        raise MethodError(f"cannot parse method name {name!r}; expected e.g. 'am' or 'am[budget=uniform]'")
    base, overrides = match.group("base"), _parse_overrides(match.group("args"), name)
    if base in (FULL, NONE, SUMMARY):
        if overrides:
            raise MethodError(f"method {base!r} takes no overrides")
        return MethodSpec(name=name, kind=base)
    if base.startswith(SUMMARY_PREFIX):
        return MethodSpec(name=name, kind=SUMMARY_COMPACTION, core_method=base.removeprefix(SUMMARY_PREFIX),
                          overrides=overrides)
    return MethodSpec(name=name, kind=COMPACTION, core_method=base, overrides=overrides)


def _coerce(raw: str, annotation: str, default: Any, where: str) -> Any:
    """Type one override from the config field's default value, or from its annotation when the default is None."""
    kind = type(default).__name__ if default is not None else annotation
    try:
        if "bool" in kind:
            if raw.lower() not in ("true", "false", "1", "0", "on", "off", "yes", "no"):
                raise ValueError("expected true/false")
            return raw.lower() in ("true", "1", "on", "yes")
        if "tuple" in kind or "list" in kind:
            return tuple(part for part in raw.split("+") if part)
        if "int" in kind:
            return int(raw)
        if "float" in kind:
            return float(raw)
    except ValueError as exc:
        raise MethodError(f"{where}: cannot read {raw!r} as {kind} ({exc})") from exc
    return raw


def coerce_overrides(spec: MethodSpec, config_cls: type) -> dict[str, Any]:
    """Overrides typed after the core's CompactionConfig dataclass fields; unknown field names are an error."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    typed: dict[str, Any] = {}
    for key, raw in spec.overrides:
        if key not in fields:
            settable = sorted(set(fields) - RESERVED_FIELDS)
            raise MethodError(f"method {spec.name!r}: unknown CompactionConfig field {key!r}; settable: {settable}")
        f = fields[key]
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is None and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        typed[key] = _coerce(raw, str(f.type), default, f"method {spec.name!r} field {key!r}")
    if spec.hints_questions:
        typed["hints"] = spec.question_hints  # empty until with_questions binds a document (validate_methods)
    return typed


def make_config(spec: MethodSpec, config_cls: type, keep_ratio: float | None = None,
                target_tokens: int | None = None) -> Any:
    """The core CompactionConfig of a compaction spec at one budget (keep ratio or target tokens)."""
    return config_cls(method=spec.core_method, keep_ratio=keep_ratio, target_tokens=target_tokens,
                      **coerce_overrides(spec, config_cls))


def validate_methods(specs: tuple[MethodSpec, ...], config_cls: type) -> None:
    """Fail before any model loads: every compaction spec must make a config the core accepts."""
    for spec in specs:
        if spec.core_method is not None:
            config = make_config(spec, config_cls, keep_ratio=1.0)  # raises MethodError on bad overrides
            try:
                config.validate()
            except ValueError as exc:
                raise MethodError(f"method {spec.name!r}: {exc}") from exc


class SummaryMemo:
    """Summaries of one document by token limit, so `summary` and `summary+X` at equal limits generate once."""

    def __init__(self) -> None:
        self._by_limit: dict[int, tuple[str, float]] = {}

    def get(self, backend: Backend, full: BuiltContext, max_tokens: int) -> tuple[str, float]:
        """(summary text, seconds it took to generate)."""
        if max_tokens not in self._by_limit:
            start = time.perf_counter()
            answer = backend.generate(full, SUMMARY_PROMPT, max_tokens)
            # An empty summary still has to be a message: the model's silence is then the whole context.
            self._by_limit[max_tokens] = (answer.text.strip() or EMPTY_SUMMARY, time.perf_counter() - start)
        return self._by_limit[max_tokens]


def budget_tokens(document_tokens: int, keep_ratio: float) -> int:
    """The token budget a keep ratio allows for a document (at least one token)."""
    return max(1, round(document_tokens * keep_ratio))


def build_context(backend: Backend, spec: MethodSpec, text: str, keep_ratio: float, full: BuiltContext,
                  summaries: SummaryMemo) -> BuiltContext:
    """The context cache `spec` makes of document `text` at `keep_ratio`; `full` is the document's full cache."""
    if spec.kind == FULL:
        return full
    if spec.kind == NONE:
        return backend.empty()
    if spec.kind == COMPACTION:
        return backend.compact(text, spec, keep_ratio=keep_ratio)
    budget = budget_tokens(full.input_tokens, keep_ratio)
    limit = budget if spec.kind == SUMMARY else min(full.input_tokens, SUMMARY_HEADROOM * budget)
    summary, seconds = summaries.get(backend, full, limit)
    if spec.kind == SUMMARY or backend.count_tokens(summary) <= budget:
        # A summary already within the budget is its own context: there is nothing left to compact.
        return backend.full(summary).with_phase("summarize", seconds)
    return backend.compact(summary, spec, target_tokens=budget).with_phase("summarize", seconds)
