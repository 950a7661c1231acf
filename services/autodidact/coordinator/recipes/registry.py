"""The implemented recipes, by the JobSpec oneof field each answers to.

Adding a recipe adds one line here (docs/extending.md); everything the job
manager needs is declared by the recipe itself (recipes/recipe.py).
"""

from __future__ import annotations

from typing import Any

from autodidact.coordinator.recipes.constitutional import Constitutional
from autodidact.coordinator.recipes.recipe import Recipe
from autodidact.coordinator.recipes.self_consistency import SelfConsistency
from autodidact.coordinator.recipes.self_instruct import SelfInstruct
from autodidact.coordinator.recipes.toolformer import Toolformer

RECIPES: dict[str, Recipe[Any]] = {
    recipe.name: recipe
    for recipe in (
        SelfInstruct(),
        Toolformer(),
        SelfConsistency(),
        Constitutional(),
    )
}
