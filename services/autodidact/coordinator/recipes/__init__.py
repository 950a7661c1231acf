"""Recipes: the four techniques as sequences of small stored stages."""
