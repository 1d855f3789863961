"""Datasets: sources and readers, built-in task generators, prompt building, split, the GX suite,
the rejection policy, DVC versioning of raw data and the MLflow dataset input."""
