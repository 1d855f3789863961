"""Stage 5, register: MLflow logging, lineage, the pyfunc model, the gate, champion moves, `grpo ask`."""
