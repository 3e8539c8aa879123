"""Recipes (the whole pipeline as one run): pydantic schema and the convert -> finetune -> report runner."""
