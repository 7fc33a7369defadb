"""Datasets: the built-in synthetic high-resolution VQA benchmark and the LLaVA JSON reader."""
