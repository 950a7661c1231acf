"""The implemented recipes, and what the job manager needs from each."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from autodidact.coordinator.recipes import constitutional, self_consistency, self_instruct, toolformer
from autodidact.coordinator.recipes.base import JobContext


@dataclass(frozen=True)
class RecipeKind:
    # (spec.<recipe>, job id) -> validated parameters; raises InvalidArgument.
    resolve: Callable[[Any, str], Any]
    # (context, parameters, max in flight) -> the job's summary.
    run: Callable[[JobContext, Any, int], Awaitable[dict[str, Any]]]
    # Stage names in lineage order; the last one decides whether an item is in the dataset.
    stages: tuple[str, ...]
    # summary -> whether an item id belongs to the dataset.
    belongs: Callable[[dict[str, Any]], Callable[[str], bool]]
    # records -> {table name: (rows, schema)}.
    tables: Callable[[list[Any]], dict[str, tuple[list[dict[str, Any]], pa.Schema]]]
    # spec -> how many dataset items the job aims at (progress); None when
    # only the running recipe knows (it then stores the job's "plan").
    target: Callable[[Any], int | None]
    # parameters -> (field, prompt, max_tokens) of the prompts known at submit,
    # checked against the generator's context then.
    prompts: Callable[[Any], Iterable[tuple[str, str, int]]] = field(default=lambda params: ())


def _longest_question(params: self_consistency.SelfConsistencyParams) -> Iterable[tuple[str, str, int]]:
    if params.questions:
        number, longest = max(enumerate(params.questions, 1), key=lambda q: len(q[1].text))
        prompt = self_consistency.cot_prompt(longest.text)
        yield f"spec.self_consistency.questions_path (question {number})", prompt, params.sampling.max_tokens


RECIPES = {
    "self_instruct": RecipeKind(
        resolve=self_instruct.resolve_params,
        run=lambda ctx, params, in_flight: self_instruct.SelfInstructRecipe(ctx, params, in_flight).run(),
        stages=self_instruct.STAGES,
        belongs=self_instruct.belongs,
        tables=self_instruct.tables,
        target=lambda spec: spec.self_instruct.target_instructions,
    ),
    "toolformer": RecipeKind(
        resolve=toolformer.resolve_params,
        run=lambda ctx, params, in_flight: toolformer.ToolformerRecipe(ctx, params).run(),
        stages=toolformer.STAGES,
        belongs=toolformer.belongs,
        tables=toolformer.tables,
        target=lambda spec: None,
    ),
    "self_consistency": RecipeKind(
        resolve=self_consistency.resolve_params,
        run=lambda ctx, params, in_flight: self_consistency.SelfConsistencyRecipe(ctx, params).run(),
        stages=self_consistency.STAGES,
        belongs=self_consistency.belongs,
        tables=self_consistency.tables,
        target=lambda spec: None,
        prompts=_longest_question,
    ),
    "constitutional": RecipeKind(
        resolve=constitutional.resolve_params,
        run=lambda ctx, params, in_flight: constitutional.ConstitutionalRecipe(ctx, params).run(),
        stages=constitutional.STAGES,
        belongs=constitutional.belongs,
        tables=constitutional.tables,
        target=lambda spec: None,
    ),
}
