"""Domain code of the GRPO pipeline: one module or subpackage per stage, free of Prefect."""
