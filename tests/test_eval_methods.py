"""Method names: parsing, CompactionConfig overrides, and which ratios each method runs at."""

from dataclasses import dataclass, field

import pytest

from workers.eval.methods import (SUMMARY_COMPACTION, MethodError, budget_tokens, coerce_overrides, parse_method,
                                  validate_methods)


@dataclass
class FakeConfig:
    method: str = "am"
    keep_ratio: float | None = None
    target_tokens: int | None = None
    query_sources: tuple[str, ...] = ("repeat",)
    budget: str = "global"
    chunk_tokens: int | None = None
    on_policy: bool = False
    max_queries_per_head: int = 4096
    extra: list = field(default_factory=list)
    hints: tuple[str, ...] = ()


def test_parse_kinds():
    assert parse_method("full").kind == "full" and not parse_method("full").uses_ratio
    assert parse_method("none").keep_ratios([0.1, 0.2]) == [0.0]
    assert parse_method("kvzip").core_method == "kvzip" and parse_method("kvzip").keep_ratios([0.1, 0.2]) == [0.1, 0.2]
    spec = parse_method("summary+am-omp-fast[budget=uniform]")
    assert spec.kind == SUMMARY_COMPACTION and spec.core_method == "am-omp-fast"
    assert spec.overrides == (("budget", "uniform"),)
    assert parse_method("summary").kind == "summary"


def test_overrides_are_typed_from_the_config():
    spec = parse_method("am[query_sources=repeat+self-study,on_policy=true,chunk_tokens=2048,max_queries_per_head=100]")
    assert coerce_overrides(spec, FakeConfig) == {"query_sources": ("repeat", "self-study"), "on_policy": True,
                                                   "chunk_tokens": 2048, "max_queries_per_head": 100}
    assert coerce_overrides(parse_method("am[query_sources=context]"), FakeConfig) == {"query_sources": ("context",)}


def test_question_hints_bind_to_each_document():
    spec = parse_method("am[hints=@questions,budget=uniform]")
    assert coerce_overrides(spec, FakeConfig) == {"hints": (), "budget": "uniform"}  # unbound: validation only
    bound = spec.with_questions(("What is the number? Answer briefly.", "Who, and why?"))
    assert bound.name == spec.name  # the same method in the result cache and the table
    assert coerce_overrides(bound, FakeConfig)["hints"] == ("What is the number? Answer briefly.", "Who, and why?")
    literal = parse_method("am[hints=first+second]")  # literal hints are untouched by binding
    assert coerce_overrides(literal.with_questions(("q",)), FakeConfig)["hints"] == ("first", "second")


@pytest.mark.parametrize("name, message", [
    ("am[budget]", "key=value"), ("am[keep_ratio=0.5]", "set by the harness"), ("full[budget=uniform]", "no overrides"),
    ("am[[x]]", "cannot parse"), ("bad name", "cannot parse"),
])
def test_bad_names(name, message):
    with pytest.raises(MethodError, match=message):
        parse_method(name)


def test_bad_overrides():
    with pytest.raises(MethodError, match="unknown CompactionConfig field 'nope'"):
        coerce_overrides(parse_method("am[nope=1]"), FakeConfig)
    with pytest.raises(MethodError, match="on_policy"):
        coerce_overrides(parse_method("am[on_policy=maybe]"), FakeConfig)
    with pytest.raises(MethodError, match="chunk_tokens"):
        coerce_overrides(parse_method("am[chunk_tokens=big]"), FakeConfig)


def test_budget_tokens():
    assert budget_tokens(1000, 0.02) == 20 and budget_tokens(10, 0.01) == 1


def test_validate_methods_checks_values_before_any_model_loads():
    @dataclass
    class ValidatingConfig(FakeConfig):
        def validate(self):
            if self.budget not in ("global", "uniform"):
                raise ValueError("budget must be global or uniform")

    specs = tuple(parse_method(n) for n in ("full", "summary", "am[budget=uniform]", "summary+am"))
    validate_methods(specs, ValidatingConfig)
    with pytest.raises(MethodError, match="method 'am\\[budget=weird\\]': budget must be"):
        validate_methods((parse_method("am[budget=weird]"),), ValidatingConfig)
