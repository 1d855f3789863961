"""Rule-based verifiers: answer extraction and reward functions (TRL's contract)."""
