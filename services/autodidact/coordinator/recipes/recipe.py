"""What a recipe declares, and the one contract the job manager relies on.

A recipe is a declared task (distilabel's Task is the model): its name (the
JobSpec oneof field it answers to), its stages in lineage order, the stages
whose decision puts an item in the dataset or not, the services it calls, its
export tables' schemas. Around those declarations it supplies four pieces of
code, each in its own part of the recipe's module:

- input loading and validation: `resolve(spec field, job id) -> params`,
  reading the job's input snapshots (`inputs` names the fields);
- prompts and parsers: pure functions the run calls (and `prompts(params)`,
  the prompts known at submit that must fit the generator's context);
- orchestration: `run(ctx, params) -> summary`, plain async code over a
  JobContext, which stores every step so a resumed job replays it;
- export: `belongs(summary)` (which item ids are dataset records) and
  `rows(records)` (each declared table's rows).

docs/extending.md walks through adding one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import pyarrow as pa

from autodidact.coordinator.recipes.base import JobContext
from autodidact.coordinator.records import Record

P = TypeVar("P")
# The services a recipe may name in `services` (the fields of base.Services).
SERVICES = ("generator", "dedup", "scorer", "tool_executor", "critic")
# (spec field path, prompt text, max_tokens): a prompt known at submit.
PromptCheck = tuple[str, str, int]


@dataclass(frozen=True)
class DecidingScore:
    """A score a filter decides by, as the job report plots it (a histogram with the job's
    thresholds drawn) and as a review gate measures its band: the `score` of `stage`'s
    decisions, compared against `thresholds` (several when tools or sides differ)."""

    stage: str
    label: str  # what the score is, in words, e.g. "similarity to the nearest kept instruction"
    thresholds: tuple[float, ...]
    keeps: str  # which side is kept, in words, e.g. "below", "at or above", "at least this far from 0.5"


class Recipe(ABC, Generic[P]):
    """One recipe: declarations as class attributes, behaviour as methods.
    Instances hold no job state (one instance serves every job); the state of
    a run lives in the object `run` builds around its JobContext."""

    name: ClassVar[str]  # the JobSpec oneof field: spec.<name> holds this recipe's spec
    stages: ClassVar[tuple[str, ...]]  # in lineage order
    # The stages whose decision says whether an item is in the dataset (the first one an item has counts).
    final_stages: ClassVar[tuple[str, ...]] = ("dataset",)
    services: ClassVar[tuple[str, ...]]  # of SERVICES: what a deployment must run for this recipe
    tables: ClassVar[dict[str, pa.Schema]]  # the export's tables: name -> schema
    # The fields of spec.<name> that name an input (an input reference: an uploaded dataset, an inline
    # input, an object or an allowed server file). The coordinator snapshots each into the job's storage
    # at submit, and `resolve` sees these fields pointing at the snapshots, never at the caller's source.
    inputs: ClassVar[tuple[str, ...]] = ()
    # A schema's columns are written as a tuple of (name, type) pairs, not a list: mypy joins a list's
    # pyarrow types (StringType, Int64Type) to `object`, which pa.schema's stub refuses.

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Checks a concrete recipe's declarations when its module is imported,
        so a mistake fails every test at once rather than one job at run time."""
        super().__init_subclass__(**kwargs)
        # ABCMeta sets __abstractmethods__ only after this hook runs: ask the methods themselves.
        if any(getattr(getattr(cls, method), "__isabstractmethod__", False) for method in ("resolve", "run", "belongs", "rows")):
            return  # an abstract intermediate class declares nothing yet
        for attribute in ("name", "stages", "services", "tables"):
            if not hasattr(cls, attribute):
                raise TypeError(f"recipe {cls.__name__} does not declare `{attribute}`")
        unknown_services = set(cls.services) - set(SERVICES)
        if unknown_services:
            raise TypeError(f"recipe {cls.__name__} names unknown services {sorted(unknown_services)}; known: {SERVICES}")
        if not set(cls.final_stages) <= set(cls.stages):
            raise TypeError(f"recipe {cls.__name__}: final_stages {cls.final_stages} are not all among its stages {cls.stages}")

    @abstractmethod
    def resolve(self, spec: Any, job_id: str) -> P:
        """Input loading and validation: spec.<name> with every default filled
        in, its input files read. Raises InvalidArgument naming the field."""

    def item_count(self, params: P) -> int:
        """How many items the job plans (prompts, questions, documents, instructions aimed at):
        what the tenant's items_per_job quota bounds. Every recipe here says; 0 bounds nothing."""
        return 0

    def target(self, spec: Any) -> int | None:
        """How many dataset items the job aims at, for progress, when the spec
        says; None when only the run knows (each_item then stores the plan)."""
        return None

    def deciding_scores(self, spec: Any) -> tuple[DecidingScore, ...]:
        """The scores this recipe's filters decide by, with the thresholds `spec` (spec.<name>,
        defaults not yet filled in) sets: read from the spec alone, so a client can say too."""
        return ()

    def prompts(self, params: P) -> Iterable[PromptCheck]:
        """The prompts known at submit, checked against the generator's context then."""
        return ()

    @abstractmethod
    async def run(self, ctx: JobContext, params: P) -> dict[str, Any]:
        """Runs (or, from what is stored, resumes) the job; returns its summary."""

    @abstractmethod
    def belongs(self, summary: dict[str, Any]) -> Callable[[str], bool]:
        """Which item ids are dataset records (lineage rows), given the summary."""

    @abstractmethod
    def rows(self, records: list[Record]) -> dict[str, list[dict[str, Any]]]:
        """Each declared table's rows, from the job's records."""

    def dataset_tables(self, records: list[Record]) -> dict[str, tuple[list[dict[str, Any]], pa.Schema]]:
        """{table: (rows, schema)} for export: `rows` paired with the declared schemas."""
        rows = self.rows(records)
        if rows.keys() != self.tables.keys():
            raise ValueError(f"recipe {self.name} returned tables {sorted(rows)}, but declares {sorted(self.tables)}")
        return {name: (rows[name], schema) for name, schema in self.tables.items()}
