"""Recipes: end-to-end uses of ctd, each readable top to bottom (importable as ctd.recipes)."""
