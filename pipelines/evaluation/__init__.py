"""Stage 4, evaluate: score candidate, reference and champion on the held-out split, compare them paired."""
