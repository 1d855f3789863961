"""Where every stage reads and writes, relative to the project root (the folder with dvc.yaml).

These paths are the contract between stages and the outs DVC versions (see dvc.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    root: Path

    @classmethod
    def find(cls, start: Path | None = None) -> Paths:
        """The project root: the nearest folder upwards that holds params.yaml, else `start`."""
        here = (start or Path.cwd()).resolve()
        for folder in (here, *here.parents):
            if (folder / "params.yaml").exists():
                return cls(folder)
        return cls(here)

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def validated_dir(self) -> Path:
        return self.root / "data" / "validated"

    @property
    def train_split(self) -> Path:
        return self.validated_dir / "train.jsonl"

    @property
    def val_split(self) -> Path:
        return self.validated_dir / "val.jsonl"

    @property
    def eval_split(self) -> Path:
        return self.validated_dir / "eval.jsonl"

    @property
    def rejected(self) -> Path:
        return self.validated_dir / "rejected.jsonl"

    @property
    def validation_report(self) -> Path:
        return self.root / "reports" / "validation.json"

    @property
    def data_docs(self) -> Path:
        return self.root / "reports" / "data-docs"

    @property
    def gx_root(self) -> Path:
        return self.root / "reports" / "gx"

    @property
    def reference_dir(self) -> Path:
        return self.root / "models" / "reference"

    @property
    def policy_dir(self) -> Path:
        return self.root / "models" / "policy"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def train_metrics(self) -> Path:
        """The headline figures of training that `dvc metrics show` compares (final reward, selected step)."""
        return self.root / "metrics" / "train.json"

    @property
    def train_summary(self) -> Path:
        """Everything training reports: the final step's metrics, validation, the MLflow run id."""
        return self.root / "reports" / "train.json"

    @property
    def train_plot(self) -> Path:
        return self.root / "plots" / "train.csv"

    @property
    def val_plot(self) -> Path:
        """Validation accuracy per evaluated step (what `dvc plots` draws beside the reward)."""
        return self.root / "plots" / "val.csv"

    @property
    def train_curves(self) -> Path:
        return self.root / "plots" / "train.png"

    @property
    def eval_metrics(self) -> Path:
        """The candidate's headline figures on the test split that `dvc metrics show` compares."""
        return self.root / "metrics" / "eval.json"

    @property
    def eval_results(self) -> Path:
        """The whole evaluation (every model's figures, the paired comparisons, the settings): what the gate reads."""
        return self.root / "reports" / "eval.json"

    @property
    def eval_report(self) -> Path:
        return self.root / "reports" / "eval.md"

    @property
    def eval_chart(self) -> Path:
        """The accuracy chart that eval.md links to by its bare name (it lies beside the report)."""
        return self.eval_report.with_name("eval.png")

    @property
    def eval_samples(self) -> Path:
        return self.root / "reports" / "eval-samples.jsonl"

    @property
    def registry_metrics(self) -> Path:
        """The registered version and the decision, for `dvc metrics show`."""
        return self.root / "metrics" / "registry.json"

    @property
    def registry_report(self) -> Path:
        """The registration in full: version, aliases, decision, its reason, the gate's checks and figures."""
        return self.root / "reports" / "registry.json"
