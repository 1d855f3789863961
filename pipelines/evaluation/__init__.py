"""Evaluation pieces: per-problem scoring, paired statistics, the champion fetch, the report."""
