"""Typed configuration: params.yaml, a preset, and `-S section.key=value` overrides.

params.yaml is the single source of truth (DVC reads the same file to decide what is stale).
A preset is a named set of overrides applied on top of it; `-S` overrides come last and use the
syntax of `dvc exp run -S`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipelines.precision import gpu_bf16, resolve_bf16


class ConfigError(ValueError):
    """A params file, preset or override that cannot be used; the message says how to fix it."""


SEED_MAX = 2**32 - 1  # numpy's and the samplers' seeds are 32-bit
MAX_PARAMS_BYTES = 1_000_000  # params.yaml larger than this is not a configuration
MAX_OVERRIDE_CHARS = 10_000  # one -S value
MAX_REWARD_PARAMS_CHARS = 10_000  # a reward's free-form `params`, as JSON
MAX_TOKENS_PER_STEP = 50_000_000  # prompts_per_step x num_generations x max_completion_length


def load_yaml(text: str, where: str) -> Any:
    """`yaml.safe_load`, refusing anchors and aliases (`&a`, `*a`): a few hundred bytes of aliases
    expand to gigabytes (a "billion laughs"), and params.yaml has no use for them. The events are
    scanned first, which costs no expansion.

    >>> load_yaml("a: 1", "x")
    {'a': 1}
    >>> load_yaml("a: &x [1]\\nb: *x", "params.yaml")
    Traceback (most recent call last):
    ...
    pipelines.config.ConfigError: params.yaml: YAML anchors and aliases (& and *) are not allowed; write the values out
    """
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise ConfigError(f"{where}: YAML anchors and aliases (& and *) are not allowed; write the values out")
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {' '.join(str(exc).split())}") from exc


class _Section(BaseModel):
    # Every numeric field carries its bounds (tests/test_config.py walks them); inf and nan are never a setting.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class CountdownConfig(_Section):
    """Countdown: reach a target with the given numbers, + - * / and parentheses, each number once."""

    count: int = Field(4, ge=2, le=6)  # numbers per problem
    min_number: int = Field(1, ge=1)
    max_number: int = Field(25, ge=1)
    max_target: int = Field(100, ge=1)

    @model_validator(mode="after")
    def _range(self) -> CountdownConfig:
        if self.min_number > self.max_number:
            raise ValueError(f"min_number ({self.min_number}) is above max_number ({self.max_number})")
        return self


class ChoiceConfig(_Section):
    """Multiple choice (task: choice): the right value among near misses."""

    options: int = Field(4, ge=2, le=8)  # options per question


class GeneratorConfig(_Section):
    """Offline data for the task (`task:`), seeded: `a op b` problems for `math` and `choice`
    (operators and operand ranges; every distinct problem at most once), multi-step problems for
    `countdown` (its own section). A task of your own brings its own `generate`, or data.path."""

    operators: list[Literal["+", "-", "*"]] = ["+", "*"]
    a_min: int = 0
    a_max: int = 9
    b_min: int = 2
    b_max: int = 19
    countdown: CountdownConfig = CountdownConfig()
    choice: ChoiceConfig = ChoiceConfig()
    num_rows: int = Field(400, ge=1)
    seed: int = Field(0, ge=0, le=SEED_MAX)

    @model_validator(mode="before")
    @classmethod
    def _no_task_here(cls, value: Any) -> Any:
        if isinstance(value, dict) and "task" in value:
            named = {"arithmetic": "math"}.get(str(value["task"]), value["task"])
            raise ValueError(
                f"data.generator.task is gone: the generator makes data for the task; write `task: {named}` "
                "at the top of params.yaml (or -S task=...) and delete data.generator.task"
            )
        return value

    @model_validator(mode="after")
    def _ranges_not_empty(self) -> GeneratorConfig:
        for name in ("a", "b"):
            lo, hi = getattr(self, f"{name}_min"), getattr(self, f"{name}_max")
            if lo > hi:
                raise ValueError(f"{name}_min ({lo}) is above {name}_max ({hi}); the operand range would be empty")
        return self


class PromptConfig(_Section):
    """How a question becomes chat messages: system prompt, worked examples, instruction. null = the
    task's own (each task brings the instruction and worked example its answers are judged by)."""

    system: str | None = None  # null = the task's (none for the built-in tasks); "" = no system prompt
    instruction: str | None = None  # must contain {question}
    # [{question, answer}] as earlier chat turns, a tool call worked through with `call` and `result`; [] = none
    examples: list[dict[str, str]] | None = None

    @field_validator("instruction")
    @classmethod
    def _has_question(cls, value: str | None) -> str | None:
        if value is not None and "{question}" not in value:
            raise ValueError(f"must contain {{question}}, where the row's question goes (got {value!r})")
        return value


class ColumnsConfig(_Section):
    """Which source column holds each field. null: `prompt` (else `question`) for the prompt, and
    `id` when the row has one (else `<file>-<line>`)."""

    prompt: str | None = None
    answer: str = "answer"
    id: str | None = None


class HubConfig(_Section):
    """Which part of a Hugging Face dataset to read (a `save_to_disk` folder or `hf:owner/name`)."""

    split: str | None = None  # required when the dataset has several splits
    subset: str | None = None  # the hub's configuration name, e.g. `main` for openai/gsm8k
    revision: str | None = None


class DataConfig(_Section):
    # A JSONL/JSON, CSV or Parquet file, a folder of them, a `save_to_disk` folder, or
    # `hf:owner/name` (needs the network); null = the built-in generator.
    path: str | None = None
    format: Literal["auto", "jsonl", "csv", "parquet", "hf"] = "auto"
    columns: ColumnsConfig = ColumnsConfig()
    hf: HubConfig = HubConfig()
    prompt: PromptConfig = PromptConfig()
    generator: GeneratorConfig = GeneratorConfig()
    eval_fraction: float = Field(0.2, gt=0, lt=1)
    max_eval_rows: int = Field(64, ge=1)
    # The validation split, for training to watch (train.eval_every, train.select): taken from
    # what is left after the eval (test) split, by another hash of the id, so the test split stays
    # put whatever these say. 0 = no validation split.
    val_fraction: float = Field(0.1, ge=0, lt=1)
    max_val_rows: int = Field(64, ge=0)
    split_seed: int = Field(0, ge=0, le=SEED_MAX)
    min_prompt_chars: int = Field(1, ge=0)
    max_prompt_chars: int = Field(4000, ge=1)
    # A local tokenizer folder (e.g. models/reference): prompt length is then checked in tokens of
    # the rendered chat prompt; while the folder is missing, in characters (the report says which).
    tokenizer: str | None = None
    min_prompt_tokens: int = Field(1, ge=0)
    max_prompt_tokens: int = Field(1024, ge=1)
    min_train_rows: int = Field(4, ge=1)
    min_eval_rows: int = Field(2, ge=1)
    min_val_rows: int = Field(0, ge=0)
    # 0: any bad row refuses the dataset. Above 0: bad rows go to data/validated/rejected.jsonl with
    # their reason, and the stage passes while rejected / all rows stays at most this fraction.
    max_rejected_fraction: float = Field(0.0, ge=0, lt=1)
    # Seconds the task's row check may take on a batch of 4096 rows (it runs in the verifier worker).
    check_timeout: float = Field(60.0, gt=0, le=86400)

    @model_validator(mode="after")
    def _min_not_above_max(self) -> DataConfig:
        for unit in ("chars", "tokens"):
            lo, hi = getattr(self, f"min_prompt_{unit}"), getattr(self, f"max_prompt_{unit}")
            if lo > hi:
                raise ValueError(f"min_prompt_{unit} ({lo}) is above max_prompt_{unit} ({hi}); no prompt would pass")
        return self

    @model_validator(mode="before")
    @classmethod
    def _no_verifier_here(cls, value: Any) -> Any:
        if isinstance(value, dict) and "verifier" in value:
            raise ValueError(
                "data.verifier is gone: the task checks the data, trains and judges; write "
                f"`task: {value['verifier'] or 'math'}` at the top of params.yaml (or -S task=...) and delete "
                "data.verifier"
            )
        return value


class TinyModelConfig(_Section):
    hidden_size: int = Field(64, ge=1)
    intermediate_size: int = Field(128, ge=1)
    num_hidden_layers: int = Field(2, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int = Field(2, ge=1)
    initializer_range: float = Field(0.02, gt=0)
    seed: int = Field(0, ge=0, le=SEED_MAX)


class SnapshotConfig(_Section):
    # `embedded` | `tiny` | a local folder | a Hugging Face hub id
    source: str = "embedded"
    revision: str | None = None
    trust_remote_code: bool = False
    tiny: TinyModelConfig = TinyModelConfig()


class LoraConfig(_Section):
    # false = full fine-tuning (then a frozen copy of the reference serves the KL term when beta > 0)
    enabled: bool = True
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"


class RewardSpec(_Section):
    name: str
    weight: float = 1.0
    # Keyword arguments bound to the function, e.g. {soft_punish_cache: 16} for `overlong`.
    params: dict[str, Any] = {}

    @field_validator("params")
    @classmethod
    def _small(cls, value: dict[str, Any]) -> dict[str, Any]:
        size = len(json.dumps(value, default=str))
        if size > MAX_REWARD_PARAMS_CHARS:
            raise ValueError(f"is {size:,} characters as JSON; keep it under {MAX_REWARD_PARAMS_CHARS:,}")
        return value


# The policy objectives (grpo/loss.py implements each; grpo/distributed.py normalises by their kind).
LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)


class TrainConfig(_Section):
    steps: int = Field(30, ge=1, le=10_000_000)
    # Stop early once training has used this many seconds (resumes count what came before); null = no limit.
    time_budget_s: float | None = Field(None, gt=0)
    prompts_per_step: int = Field(2, ge=1, le=65_536)
    num_generations: int = Field(8, ge=2, le=4096)
    max_completion_length: int = Field(48, ge=1, le=131_072)
    # EOS is not sampled before this many tokens (transformers' min_new_tokens); 0 = no minimum.
    # Mostly for benchmarks: every completion then costs the same work.
    min_completion_length: int = Field(0, ge=0)
    # Below 0.01 the logits / temperature overflow to inf and training turns the weights to NaN.
    temperature: float = Field(1.0, ge=0.01, le=100)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # 0 = off
    learning_rate: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    # The learning rate after warmup, over `steps` x `num_iterations` optimiser steps (transformers'
    # schedules of the same names): constant | linear (to zero, TRL's default) | cosine (to zero).
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    beta: float = Field(0.0, ge=0)
    epsilon: float = Field(0.2, gt=0, le=1)  # the ratio's lower clip is 1 - epsilon
    epsilon_high: float | None = Field(None, gt=0)
    loss_type: LossType = "dapo"
    importance_sampling_level: Literal["token", "sequence"] = "token"
    # Two-sided clipping (INTELLECT-2, TRL's delta): cap the importance ratio of tokens with negative
    # advantage at delta (> 1 + epsilon_high); null = off. The clipped loss types only, as in TRL.
    delta: float | None = Field(None, gt=1.0)
    # Train only on the tokens whose entropy is in this top share of the batch's (TRL's
    # top_entropy_quantile, "Beyond the 80/20 rule": 0.2); 1.0 = every token.
    top_entropy_quantile: float = Field(1.0, gt=0.0, le=1.0)
    # Entropy bonus: loss - entropy_coef x mean token entropy (TRL's static entropy_coef); 0 = off.
    entropy_coef: float = Field(0.0, ge=0.0)
    # loss_type sapo: the soft gate's temperatures for positive and for other advantages (TRL's defaults).
    sapo_temperature_pos: float = Field(1.0, gt=0.0)
    sapo_temperature_neg: float = Field(1.05, gt=0.0)
    num_iterations: int = Field(1, ge=1)
    scale_rewards: Literal["group", "batch", "none"] = "group"
    mask_truncated_completions: bool = False
    # Importance-sampling correction for the sampler not being bit-for-bit the trained model
    # (pipelines/grpo/sampling_correction.py; TRL's vllm_importance_sampling_mode and _clip_max/_min):
    # none | token_truncate | token_mask | sequence_truncate | sequence_mask.
    sampling_correction: Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = (
        "sequence_mask"
    )
    sampling_correction_max: float | None = Field(3.0, gt=0)
    sampling_correction_min: float | None = Field(None, ge=0)
    # null = the task's own rewards at their default weights (math: accuracy 1.0, format 0.2). A list
    # names the task's rewards and the generic `length` and `overlong`; another task's are refused.
    rewards: list[RewardSpec] | None = None
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize"
    reward_timeout: float = Field(30.0, gt=0)
    # DAPO dynamic sampling: groups whose rewards are all equal carry no gradient; drop them and
    # sample more prompts until the batch is full, at most `max_resample_rounds` extra rounds.
    dynamic_sampling: bool = False
    max_resample_rounds: int = Field(4, ge=0)
    # Prompts a dynamic-sampling round draws per prompt still missing. A round costs about as long
    # as its longest completion, whatever the rows (finished rows leave the batch), so one round of
    # 8 prompts beats rounds of 4, 2 and 1. `auto`: 1 / the share of groups with signal at the
    # previous step, at most 4; a number fixes it; 1 draws only what is missing (the DAPO paper's
    # loop). Groups with signal beyond the batch are dropped, as verl's DAPO recipe does.
    dynamic_sampling_oversample: Literal["auto"] | float = "auto"
    # Selective rollouts (GRESO): skip a prompt before sampling it when its last groups had
    # all-equal rewards, with probability 1 - explore ** (flat visits in a row, at most 4);
    # pipelines/grpo/prompt_sampler.py. Saves the generation that dynamic sampling would throw away.
    selective_rollouts: bool = False
    selective_rollouts_explore: float = Field(0.5, gt=0, lt=1)
    lora: LoraConfig = LoraConfig()
    # true | false | auto: bf16 autocast and bf16 frozen weights; auto = only where the CPU has
    # bf16 instructions (pipelines/precision.py: elsewhere bf16 is tens of times slower than fp32).
    bf16: bool = Field("auto", validate_default=True)
    # Recompute each decoder layer's activations in backward instead of keeping them: less memory
    # for long completions or large models, about a third more training-pass time. The log-prob
    # pass then runs prompt and completion together (no shared prompt cache: checkpointing drops it).
    gradient_checkpointing: bool = False
    seed: int = Field(0, ge=0, le=SEED_MAX)
    log_samples: int = Field(4, ge=0)
    # Exact resume: a checkpoint every N steps in checkpoints/ (0 = only at the end); the next
    # `grpo train` with the same config continues from the newest one.
    checkpoint_every: int = Field(10, ge=0)
    keep_checkpoints: int = Field(2, ge=1)
    # Each validated step is an MLflow LoggedModel (pipelines/grpo/logged_models.py); those whose
    # weights are kept (keep_checkpoints, and the best) upload their adapter, about 23 MB each for
    # the demo, so that `grpo promote --checkpoint` can register them. false: metrics only.
    checkpoint_model_weights: bool = True
    # The rollout ledger (ledger/, pipelines/grpo/ledger.py): every Nth step's rollouts; 0 = none.
    ledger_every: int = Field(1, ge=0, le=1_000_000)
    resume: bool = True
    # Data parallelism: above 1, `grpo train` runs this many processes under torchrun (gloo on CPU,
    # nccl on GPU), each sampling a slice of every step's prompts; the update equals one process's.
    num_processes: int = Field(1, ge=1, le=1024)
    # Full fine-tuning sharded over those processes with PyTorch FSDP2 (pipelines/grpo/sharding.py): each
    # holds 1/N of the weights, gradients and optimiser state, for a model whose training state does not
    # fit one GPU; the updates equal one process's. With one process there is nothing to shard: the
    # plain model trains. Needs train.lora.enabled=false and a local rollout backend (lean or hf).
    fsdp: bool = False
    # Validation during training (pipelines/grpo/validation.py): greedy accuracy on the validation
    # split before the first step, every `eval_every` steps and after the last; 0 = only those two.
    # Needs data.val_fraction > 0; without a validation split nothing is evaluated.
    eval_every: int = Field(5, ge=0)
    # Which policy leaves `train`: the evaluated step with the best validation accuracy (ties go to
    # the earlier step; the reference itself, step 0, is never selected) or the last step.
    select: Literal["best", "last"] = "best"
    # With select: best, a later evaluated step within this many standard errors of the best
    # accuracy is selected instead (sqrt(p(1-p)/n) on n validation problems): the best of a few
    # dozen noisy scores is often a lucky early step, while a real decline falls outside the
    # tolerance. 0 = the best step itself, ties to the earlier.
    select_tolerance: float = Field(0.5, ge=0)
    # Stop after this many evaluations in a row without a better validation accuracy; null = never.
    early_stopping_patience: int | None = Field(None, ge=1)
    # The decline alarm: warn when, over this many evaluations, training reward rose while
    # validation accuracy fell (the policy is learning the reward, not the skill).
    decline_window: int = Field(3, ge=2)
    # ... and only when accuracy fell by more than this many standard errors (of the earlier score;
    # for lenient accuracy below the reference's, of the reference's): on 64 problems one standard
    # error is 4-6 points, so a smaller fall is as likely noise as a decline. 0 = any fall.
    decline_tolerance: float = Field(1.0, ge=0)

    @field_validator("bf16", mode="before")
    @classmethod
    def _bf16(cls, value: Any) -> Any:
        return resolve_bf16(value, "train.bf16")

    @field_validator("dynamic_sampling_oversample")
    @classmethod
    def _oversample(cls, value: Any) -> Any:
        if value != "auto" and value < 1:
            raise ValueError(f"must be 'auto' or a number >= 1 (got {value}); 1 draws only the prompts still missing")
        return value

    @field_validator("rewards")
    @classmethod
    def _some_rewards(cls, value: list[RewardSpec] | None) -> list[RewardSpec] | None:
        if value is not None and not value:
            raise ValueError("is empty: name at least one reward, or leave it null for the task's own rewards")
        return value

    @model_validator(mode="after")
    def _fsdp_shards_full_weights(self) -> TrainConfig:
        if self.fsdp and self.lora.enabled:
            raise ValueError(
                "fsdp=true shards full fine-tuning; a LoRA adapter and its optimiser state are small enough for "
                "every process to hold (plain data parallelism): set train.lora.enabled=false to shard the full "
                "model, or train.fsdp=false to train the adapter"
            )
        return self

    @model_validator(mode="after")
    def _step_fits(self) -> TrainConfig:
        tokens = self.prompts_per_step * self.num_generations * self.max_completion_length
        if tokens > MAX_TOKENS_PER_STEP:
            raise ValueError(
                f"prompts_per_step x num_generations x max_completion_length = {tokens:,} tokens a step, above "
                f"{MAX_TOKENS_PER_STEP:,}: no machine holds that batch; lower one of them"
            )
        return self

    @model_validator(mode="after")
    def _correction_sees_the_same_distribution(self) -> TrainConfig:
        # The sampler reports log-probs of the truncated, renormalised distribution it drew from; the
        # trainer's are over the full vocabulary, so their ratio would be biased below 1 on every token.
        truncating = [f"top_p={self.top_p}"] * (self.top_p < 1) + [f"top_k={self.top_k}"] * (self.top_k > 0)
        if truncating and self.sampling_correction != "none":
            raise ValueError(
                f"sampling_correction={self.sampling_correction} with {' and '.join(truncating)}: the sampler's "
                "log-probs come from a truncated distribution and the trainer's from the full vocabulary, so the "
                "importance ratio would be biased; set sampling_correction: none, or top_p: 1.0 and top_k: 0"
            )
        return self

    @model_validator(mode="after")
    def _min_not_above_max(self) -> TrainConfig:
        if self.min_completion_length > self.max_completion_length:
            raise ValueError(
                f"min_completion_length ({self.min_completion_length}) is above max_completion_length "
                f"({self.max_completion_length}); lower it or raise train.max_completion_length"
            )
        return self


class EvaluateConfig(_Section):
    max_new_tokens: int = Field(48, ge=1, le=131_072)
    batch_size: int = Field(
        64, ge=1, le=65_536
    )  # sequences per decoding call (decoding is memory-bound: more rows cost little)
    bf16: bool = Field("auto", validate_default=True)  # true | false | auto, as train.bf16
    # Sampled answers per problem for pass@k, mean@k and maj@k; every model gets the same decoding
    # and the same seed, so the models are compared on equal terms.
    k: int = Field(4, ge=1, le=1024)
    temperature: float = Field(0.8, ge=0.01, le=100)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    # Re-score the registry's `champion` on the same problems (the promotion gate needs it).
    champion: bool = True
    # Paired bootstrap over problems for the confidence interval of each accuracy difference.
    bootstrap_samples: int = Field(2000, ge=100, le=1_000_000)
    confidence: float = Field(0.95, gt=0, lt=1)
    # Seconds the verifier worker may take to judge one batch of answers (verifiers/runner.py); a
    # batch that overruns stops evaluation with an error naming this key.
    judge_timeout: float = Field(30.0, gt=0)

    @field_validator("bf16", mode="before")
    @classmethod
    def _bf16(cls, value: Any) -> Any:
        return resolve_bf16(value, "evaluate.bf16")


class RegisterConfig(_Section):
    model_name: str = "grpo-policy"
    experiment: str = "grpo"
    # The promotion gate: `champion` moves to a new version only when every rule holds, judged on
    # the per-problem outcomes of the candidate and of the champion re-scored on the same problems.
    # The accuracy gain over the champion (with no champion yet: over the reference) must be
    # positive and at least this much.
    min_gain: float = Field(0.0, ge=0, le=1)
    # The lower end of the bootstrap interval of that gain must be above zero.
    require_ci_above_zero: bool = True
    # An absolute floor: the candidate's accuracy must be at least this (0: no floor).
    min_accuracy: float = Field(0.0, ge=0, le=1)
    # The candidate's greedy answers must end in the `#### N` format at least this often.
    min_format_rate: float = Field(0.0, ge=0, le=1)
    # The candidate's accuracy must not be below the reference's on the same problems.
    no_regression_vs_reference: bool = True
    # The candidate's lenient accuracy (the last number in the answer is right, any format) must not
    # be below the reference's: a gain in format alone must not hide lost skill.
    no_skill_regression: bool = False
    # The task's judge must agree with training's correctness reward on every completion of the last
    # ledger step (evaluate re-judges them): a gain the judge sees that training did not reward, or
    # the reverse, is not a result to promote on.
    require_judge_agreement: bool = True
    # The export-parity check (pipelines/registry/parity.py): before a version is created, its logged
    # files are loaded in a fresh process through mlflow.pyfunc and through transformers + peft and
    # must give the evaluated policy's log-probs within export_atol; an adapter whose effect on the
    # base is within export_atol is refused as a no-op. Off only to register without it (not advised).
    export_check: bool = True
    export_atol: float = Field(1e-4, gt=0, le=1)


# The rollout backends by name (pipelines/generation/backends.py implements each, under the same name).
RolloutBackendName = Literal["lean", "hf", "vllm"]
ROLLOUT_BACKENDS: tuple[str, ...] = get_args(RolloutBackendName)


class VLLMConfig(_Section):
    """The vLLM server behind `runtime.rollout_backend: vllm` (pipelines/generation/vllm_server.py)."""

    # A running server (e.g. http://gpu-box:8000); it must read the adapter folders training writes
    # (a shared filesystem). null = start one on loopback for the stage and stop it after.
    url: str | None = None
    # The Python of the environment that has vLLM (`make vllm` creates .venv-vllm), relative to the project.
    python: str = ".venv-vllm/bin/python"
    # The base model's name on a running server; null = the first model it lists.
    served_model_name: str | None = None
    # auto = bf16 where the stage computes in bf16 (train.bf16 / evaluate.bf16), else float32.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int = Field(1024, ge=16)
    # LoRA rank the server accepts; null = train.lora.r (vLLM wants one of 8, 16, 32, 64, ...; rounded up).
    max_lora_rank: int | None = Field(None, ge=1)
    kv_cache_gib: float = Field(2.0, gt=0)  # VLLM_CPU_KVCACHE_SPACE on CPU builds
    enforce_eager: bool = True  # no CUDA graphs / torch.compile: faster start, what the CPU build runs anyway
    # Chunked prefill splits long or many prompts over engine steps. Off by default: on the CPU build,
    # a seeded request whose prefill is chunked crashes the engine ("CPU Generator does not use
    # offset", seen with 16 prompts x 4 samples), and rollouts always seed. On a GPU server it is safe.
    chunked_prefill: bool = False
    startup_timeout_s: float = Field(600.0, gt=0)
    request_timeout_s: float = Field(600.0, gt=0)
    extra_args: list[str] = []  # passed to the server as they are, e.g. ["--gpu-memory-utilization", "0.5"]


# Where models run (pipelines/device.py): auto = the GPU where torch sees one, else the CPU.
Device = Literal["auto", "cpu", "cuda"]
DEVICES: tuple[str, ...] = get_args(Device)


class RuntimeConfig(_Section):
    # auto | cpu | cuda. Training, its validation, evaluate, the export-parity probe and `grpo ask`
    # run there; under torchrun each process takes the GPU of its LOCAL_RANK.
    device: Device = "auto"
    # torch threads: 0 keeps torch's default. Tiny models run far faster on 1 thread (torch's per-op
    # overhead with 2 threads dwarfs their arithmetic); large matmuls gain from more.
    num_threads: int = Field(0, ge=0)
    dvc_remote: str = "local"
    # How completions are sampled (pipelines/generation/backends.py): `lean` (own KV-cached loop, fastest
    # on CPU), `hf` (model.generate) or `vllm` (a vLLM server over its OpenAI-compatible API: `vllm`).
    rollout_backend: RolloutBackendName = "lean"
    vllm: VLLMConfig = VLLMConfig()


class OrchestrationConfig(_Section):
    """How `grpo serve` runs the pipeline as a service (flows/serve.py); no stage reads it."""

    # When the training flow runs on its own (cron, in `timezone`); null = no schedule.
    cron: str | None = "0 2 * * *"
    timezone: str = "UTC"
    # Retrain when `grpo data add` (or the watcher) announces new data (event grpo.dataset.updated).
    retrain_on_new_data: bool = True
    # Files or folders (relative to the project) the watcher polls; when one's digest changes it is
    # versioned and announced as `grpo data add` would. Empty: no watcher.
    watch: list[str] = []
    watch_every_s: int = Field(300, ge=10)
    # How long a promotion that asks for approval waits for an answer before it fails.
    approval_timeout_s: int = Field(3600, ge=1)

    @field_validator("cron")
    @classmethod
    def _cron_fields(cls, value: str | None) -> str | None:
        if value is not None and len(value.split()) not in (5, 6):
            raise ValueError(
                f"{value!r} is not a cron expression; write 5 fields, e.g. '0 2 * * *' for 02:00 daily, or null"
            )
        return value


BUILTIN_TASK_FOLDER = "pipelines/verifiers"


class Config(_Section):
    preset: str | None = None
    # What "right" means (pipelines/verifiers/task.py): the prompt, the rewards and the judge, as one
    # object. math | countdown | choice, or your own: path/to/file.py:NAME or package.module:NAME.
    task: str = Field("math", min_length=1, max_length=500)
    # The file (or folder) of your own task's code: a DVC dependency of validate, train and evaluate,
    # so that changing it re-runs them. The built-in tasks live in pipelines/verifiers.
    task_file: str = Field(BUILTIN_TASK_FOLDER, min_length=1, max_length=500)
    data: DataConfig = DataConfig()
    snapshot: SnapshotConfig = SnapshotConfig()
    train: TrainConfig = Field(
        default_factory=TrainConfig
    )  # built when a config is, not at import: `bf16: auto` reads the CPU
    evaluate: EvaluateConfig = Field(
        default_factory=EvaluateConfig
    )  # built when a config is, not at import: `bf16: auto` reads the CPU
    registry: RegisterConfig = RegisterConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()

    @model_validator(mode="before")
    @classmethod
    def _bf16_where_it_runs(cls, data: Any) -> Any:
        """`bf16: auto` asks the device the stages run on: on a GPU its answer, not the CPU's."""
        if not isinstance(data, dict):
            return data
        runtime = data.get("runtime")
        device = runtime.get("device", "auto") if isinstance(runtime, dict) else getattr(runtime, "device", "auto")
        on_gpu = gpu_bf16(device)
        if on_gpu is None:
            return data
        data = dict(data)
        for section in ("train", "evaluate"):
            part = data.get(section)
            part = {} if part is None else part
            if isinstance(part, dict) and str(part.get("bf16", "auto")).strip().lower() == "auto":
                data[section] = {**part, "bf16": on_gpu}
        return data

    @model_validator(mode="after")
    def _fsdp_samples_locally(self) -> Config:
        # Before _vllm_trains_adapters, whose fix (LoRA) train.fsdp refuses.
        if self.train.fsdp and self.runtime.rollout_backend == "vllm":
            raise ValueError(
                "train.fsdp=true with runtime.rollout_backend=vllm: a vLLM server samples from LoRA adapters pushed "
                "to it, and FSDP shards full fine-tuning (full weights would have to be streamed into the server, "
                "which is not built): set runtime.rollout_backend=lean or hf, or train.fsdp=false"
            )
        return self

    @model_validator(mode="after")
    def _vllm_trains_adapters(self) -> Config:
        # Refused here rather than when the trainer meets the server: by then the server has started.
        if self.runtime.rollout_backend == "vllm" and not self.train.lora.enabled:
            raise ValueError(
                "runtime.rollout_backend=vllm trains LoRA adapters only (the adapter reaches the server every step; "
                "full weights would have to be streamed into it, which is not built): set train.lora.enabled=true, "
                "or use runtime.rollout_backend=lean or hf"
            )
        return self

    @model_validator(mode="after")
    def _task_file_covers_task(self) -> Config:
        own = user_task_path(self.task)
        if own is None:
            return self
        folder = Path(self.task_file.rstrip("/"))
        if own != folder and folder not in own.parents:
            raise ValueError(
                f"task is {self.task} but task_file is {self.task_file}: set task_file: {own.as_posix()} so that "
                "DVC re-runs validate, train and evaluate when that file changes"
            )
        return self


def user_task_path(task: str) -> Path | None:
    """The file a `task: path/to/file.py[:NAME]` names (as written, relative to the project); None otherwise.

    >>> user_task_path("tests/my_task.py:Yes").as_posix(), user_task_path("math"), user_task_path("pkg.mod:TASK")
    ('tests/my_task.py', None, None)
    """
    where = task.rpartition(":")[0] if ":" in task and not task.endswith(".py") else task
    return Path(where) if where.endswith(".py") else None


# Presets are overrides on top of params.yaml. `smoke` runs the whole pipeline in about a minute
# on a tiny randomly initialised model; it proves plumbing, not learning.
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "snapshot.source": "tiny",
        # Heads of 32 dimensions, not the tiny default's 16: vLLM's CPU attention runs no smaller ones, and
        # `grpo run --preset smoke -S runtime.rollout_backend=vllm` is how one checks that backend.
        "snapshot.tiny.num_attention_heads": 2,
        "snapshot.tiny.num_key_value_heads": 1,
        "data.generator.num_rows": 48,
        "data.max_eval_rows": 8,
        "data.eval_fraction": 0.2,  # the demo's 0.75 suits its 360 problems; 48 rows keep the usual shares
        "data.val_fraction": 0.1,
        "train.steps": 2,
        "train.prompts_per_step": 2,
        "train.num_generations": 4,
        "train.max_completion_length": 8,
        # A random model's groups are nearly all flat: resampling them would only multiply generation.
        "train.dynamic_sampling": False,
        "train.bf16": False,
        "train.lora.r": 4,
        "train.lora.alpha": 8,
        "evaluate.max_new_tokens": 8,
        "evaluate.bf16": False,
        "evaluate.k": 2,
        "evaluate.bootstrap_samples": 200,
        "runtime.num_threads": 1,
    },
    # `tools`: the calculator task (pipelines/verifiers/calculator_task.py) on the embedded model: two- and
    # three-digit multiplication, which the model cannot do in its head, with a calculator it can call.
    "tools": {
        "task": "calculator",
        "data.generator.operators": ["*"],
        "data.generator.a_min": 10,
        "data.generator.a_max": 999,
        "data.generator.b_min": 10,
        "data.generator.b_max": 999,
        "data.generator.num_rows": 1200,
        "train.prompts_per_step": 4,
        "train.max_completion_length": 128,  # a call, the tool's reply and the answer
        "evaluate.max_new_tokens": 128,
    },
}


def preset_overrides(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def parse_override(text: str) -> tuple[str, Any]:
    """`train.steps=5` -> ("train.steps", 5); the value is read as YAML, like `dvc exp run -S`."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not KEY=VALUE; write it like -S train.steps=5")
    if key.strip() == "preset":
        # `preset` is only a label of what write_params wrote: setting it would tag a run with a
        # preset whose values it did not use.
        name = raw.strip() or "NAME"
        raise ConfigError(f"-S {text} would only relabel the run, not apply the preset; use --preset {name}")
    if len(raw) > MAX_OVERRIDE_CHARS:
        raise ConfigError(
            f"override {key.strip()}: the value is {len(raw):,} characters; keep it under {MAX_OVERRIDE_CHARS:,}"
        )
    try:
        value = load_yaml(raw, f"override {key.strip()}") if raw.strip() else None
    except ConfigError as exc:
        if "anchors and aliases" in str(exc):
            raise
        reason = " ".join(str(exc.__cause__ or exc).split())  # one line: the CLI prints it as is
        raise ConfigError(f"override {text[:200]!r}: the value is not valid YAML ({reason}); quote it") from exc
    return key.strip(), value


def with_implied(pairs: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The overrides, plus `task_file` when `task` is set without it: the task's own file (or the
    built-in tasks' folder) becomes the DVC dependency, as params.yaml must then say.

    >>> with_implied([("task", "my_task.py:Yes")])
    [('task', 'my_task.py:Yes'), ('task_file', 'my_task.py')]
    """
    keys = {key for key, _ in pairs}
    task = dict(pairs).get("task")
    if "task" not in keys or "task_file" in keys or not isinstance(task, str):
        return pairs
    own = user_task_path(task)
    return [*pairs, ("task_file", own.as_posix() if own is not None else BUILTIN_TASK_FOLDER)]


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def resolve(raw: dict[str, Any], overrides: list[str] | None = None, preset: str | None = None) -> Config:
    """Build the typed config: params dict, then the preset's keys, then `-S` overrides.

    The `preset` key in params.yaml is only a label of what was written there (see
    `write_params`); a preset is applied only when asked for.
    """
    tree = copy.deepcopy(raw or {})
    if preset:
        for key, value in preset_overrides(preset).items():
            set_dotted(tree, key, value)
        tree["preset"] = preset
    for key, value in with_implied([parse_override(o) for o in overrides or []]):
        set_dotted(tree, key, value)
    check_preset_label(tree)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        # One line (the CLI prints it as is): each bad key, what is wrong, and the value given.
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "task, task_file"
            given = err.get("input")
            got = f" (got {given!r})" if isinstance(given, (str, int, float)) and err["type"] != "missing" else ""
            problems.append(f"{where}: {err['msg']}{got}")
        raise ConfigError(
            "invalid configuration (params.yaml, preset or -S overrides): " + "; ".join(problems)
        ) from exc


def check_preset_label(tree: dict[str, Any]) -> None:
    """Refuse a `preset:` label over values that are not the preset's.

    `dvc exp run -S preset=smoke` writes the label alone: the stages would then train the full model
    for the full run under a `smoke` tag (and DVC deletes the last run's outputs first). A label
    whose preset holds most of its values passes: a few keys changed on top of a preset (`grpo run
    --preset smoke -S train.steps=5`) is still that preset.
    """
    name = tree.get("preset")
    if not name:
        return
    preset = preset_overrides(str(name))
    differing = [key for key, value in preset.items() if _dotted(tree, key) != value]
    if 2 * len(differing) <= len(preset):
        return
    shown = ", ".join(f"{key} is {_dotted(tree, key)!r}, not {preset[key]!r}" for key in differing[:3])
    raise ConfigError(
        f"params.yaml is labelled `preset: {name}` but holds {len(differing)} of that preset's {len(preset)} values "
        f"otherwise ({shown}, ...): the label was set without the values, as `dvc exp run -S preset={name}` does. "
        f"Apply the preset with `grpo run --preset {name}` (or `dvc exp run` with its values as -S), "
        "or set `preset: null`"
    )


def _dotted(tree: dict[str, Any], key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def read_params(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"{path} not found: run grpo from the project folder (the one with dvc.yaml and params.yaml)")
    if path.stat().st_size > MAX_PARAMS_BYTES:
        raise ConfigError(
            f"{path} is {path.stat().st_size:,} bytes, not a configuration (at most {MAX_PARAMS_BYTES:,})"
        )
    data = load_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (data:, train:, ...)")
    return data


def load(params_path: Path, overrides: list[str] | None = None, preset: str | None = None) -> Config:
    return resolve(read_params(params_path), overrides, preset)
