"""The registry is derived from the recipes, and every recipe's declarations hold together."""

from __future__ import annotations

from typing import Any

import pytest

from autodidact.coordinator.recipes.recipe import SERVICES, Recipe
from autodidact.coordinator.recipes.registry import RECIPES
from autodidact.v1 import coordinator_pb2


def test_every_recipe_field_of_the_job_spec_has_a_recipe_and_no_other() -> None:
    fields = {field.name for field in coordinator_pb2.JobSpec.DESCRIPTOR.oneofs_by_name["recipe"].fields}
    assert set(RECIPES) == fields


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_recipe_declares_what_the_job_manager_needs(name: str) -> None:
    recipe = RECIPES[name]
    assert recipe.name == name
    assert recipe.stages and len(set(recipe.stages)) == len(recipe.stages)
    assert recipe.final_stages and set(recipe.final_stages) <= set(recipe.stages)
    assert recipe.services and set(recipe.services) <= set(SERVICES)
    for table, schema in recipe.tables.items():
        assert schema.names[0] == "item_id", table  # every row names the item it came from
    assert recipe.rows([]) == {table: [] for table in recipe.tables}


def test_a_recipe_missing_a_declaration_is_refused_when_defined() -> None:
    with pytest.raises(TypeError, match="does not declare `tables`"):

        class Incomplete(Recipe[None]):
            name = "incomplete"
            stages = ("dataset",)
            services = ("generator",)

            def resolve(self, spec: Any, job_id: str) -> None:
                return None

            async def run(self, ctx: Any, params: None) -> dict[str, Any]:
                return {}

            def belongs(self, summary: dict[str, Any]) -> Any:
                return lambda item_id: True

            def rows(self, records: list[Any]) -> dict[str, list[dict[str, Any]]]:
                return {}
