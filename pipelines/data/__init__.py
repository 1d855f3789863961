"""Datasets: sources, built-in task generators, prompt building, split, and the GX suite."""
