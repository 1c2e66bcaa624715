"""Typed params: params.yaml is loaded into pydantic models, one section per stage.

An unknown key, a wrong type or a missing file raises ParamsError with one message that names the
key or the file; nothing downstream ever sees an unchecked value.
"""

from __future__ import annotations

import difflib
from functools import cache, cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from flywheel.errors import ParamsError

PARAMS_FILE = "params.yaml"
RAW_DIR = "data/raw"


def glob_under_raw_dir(path: str) -> str:
    # DVC tracks data/raw as a stage dependency; input elsewhere would be read without DVC
    # noticing when it changes.
    if not path.startswith(f"{RAW_DIR}/") or ".." in Path(path).parts:
        raise ValueError(f"must be a glob under {RAW_DIR}/ (got {path!r})")
    return path


def _inside_project(path: str) -> str:
    # A path in params is read or written by stages, the server and the monitor; a run's conf or
    # a stray edit must not point them at /etc/shadow or /etc/cron.d. Serve a model from
    # elsewhere with `flywheel serve --model DIR`.
    if Path(path).is_absolute() or ".." in Path(path).parts:
        raise ValueError("must be a path inside the project, relative to its root")
    return path


ProjectPath = Annotated[str, AfterValidator(_inside_project)]


class _Section(BaseModel):
    # extra="forbid" is what turns a typo in params.yaml into an error instead of a silent default.
    model_config = ConfigDict(extra="forbid", frozen=True)


SourceKind = Literal["pair", "messages", "transcript", "preference"]
SourceFormat = Literal["auto", "jsonl", "json", "csv", "parquet"]

# For each kind of source: the canonical roles it must fill and the ones it may fill.
# `fields` in a source maps a role to the field name in the raw records (default: the role's name).
SOURCE_ROLES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "pair": (("prompt", "response"), ("context", "system")),
    "messages": (("messages",), ()),
    "transcript": (("text",), ("system",)),
    # Without a `prompt` role, chosen and rejected are whole Human:/Assistant: transcripts.
    "preference": (("chosen", "rejected"), ("prompt", "context", "system")),
}


class SourceParams(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    path: str = Field(description="glob relative to the project root, under data/raw/")
    kind: SourceKind
    format: SourceFormat = "auto"
    fields: dict[str, str] = Field(default_factory=dict)
    license: str = "unknown"

    @field_validator("path")
    @classmethod
    def _under_raw_dir(cls, path: str) -> str:
        return glob_under_raw_dir(path)

    @model_validator(mode="after")
    def _fields_fit_kind(self) -> SourceParams:
        required, optional = SOURCE_ROLES[self.kind]
        unknown = set(self.fields) - set(required) - set(optional)
        if unknown:
            allowed = ", ".join(required + optional)
            raise ValueError(f"fields {sorted(unknown)} do not apply to kind {self.kind!r} (allowed: {allowed})")
        return self

    @cached_property
    def role_fields(self) -> dict[str, str]:
        """Role -> raw field name, for every role this source fills (computed once: hot path)."""
        required, optional = SOURCE_ROLES[self.kind]
        mapping = {role: self.fields.get(role, role) for role in required}
        for role in optional:
            # preference: an unmapped prompt means the pairs are whole transcripts
            if role in self.fields or self.kind != "preference":
                mapping[role] = self.fields.get(role, role)
        return mapping

    def field_for(self, role: str) -> str | None:
        """The raw field name that fills `role`, or None if this source does not fill it."""
        return self.role_fields.get(role)


class IngestParams(_Section):
    sources: list[SourceParams] = Field(min_length=1)
    chunk_size: int = Field(default=10_000, ge=1, description="records per Parquet row group")
    max_quarantine_share: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="a source with a larger share of its items quarantined fails ingest (a wrong field "
        "mapping quarantines them all)",
    )
    warn_quarantine_share: float = Field(
        default=0.05, ge=0, le=1, description="a source with a larger share quarantined is reported as a warning"
    )

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[SourceParams]) -> list[SourceParams]:
        names = [s.name for s in sources]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"source names must be unique; repeated: {duplicates}")
        return sources


class QualityFilterParams(_Section):
    """Each filter removes a record with a reason named after it (see flywheel/data/clean.py)."""

    min_prompt_chars: int = Field(default=1, ge=0)
    min_response_chars: int = Field(default=1, ge=0)
    max_chars: int = Field(default=20_000, ge=1, description="prompt + context + response")
    max_duplicate_line_fraction: float = Field(default=0.3, ge=0, le=1, description="of the response's lines")
    repeated_ngram_size: int = Field(
        default=10, ge=2, description="words per n-gram of the repetition filter (on the response alone)"
    )
    max_repeated_ngram_char_fraction: float = Field(
        default=0.6, ge=0, le=1, description="share of the response's characters inside repeated n-grams"
    )
    max_symbol_word_ratio: float = Field(default=0.3, ge=0, le=1)
    max_non_alpha_ratio: float = Field(default=0.6, ge=0, le=1)
    max_pii_token_fraction: float = Field(default=0.5, ge=0, le=1)


class MinHashParams(_Section):
    shingle_size: int = Field(default=3, ge=1, description="words per shingle")
    num_perm: int = Field(default=128, ge=8)
    bands: int = Field(default=32, ge=1)
    rows: int = Field(default=4, ge=1)
    threshold: float = Field(default=0.7, gt=0, le=1, description="estimated Jaccard similarity")
    seed: int = 1

    @model_validator(mode="after")
    def _bands_fit(self) -> MinHashParams:
        if self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands * rows ({self.bands} * {self.rows}) exceeds num_perm ({self.num_perm})")
        return self


class DedupParams(_Section):
    exact: bool = True
    near: bool = True
    minhash: MinHashParams = Field(default_factory=MinHashParams)


class CleanParams(_Section):
    strip_markup: bool = True
    redact_pii: bool = True
    filters: QualityFilterParams = Field(default_factory=QualityFilterParams)
    dedup: DedupParams = Field(default_factory=DedupParams)
    batch_size: int = Field(default=10_000, ge=1, description="records per batch (bounds memory)")


Severity = Literal["critical", "warning"]


class ValidateParams(_Section):
    """The Great Expectations suite run on the cleaned records; each check has a severity."""

    columns: list[str] = Field(
        default_factory=lambda: [
            "id",
            "prompt",
            "response",
            "context",
            "system",
            "source",
            "license",
            "ingested_at",
            "metadata",
        ]
    )
    not_null: list[str] = Field(default_factory=lambda: ["id", "prompt", "response", "source"])
    unique: list[str] = Field(default_factory=lambda: ["id"])
    lengths: dict[str, tuple[int, int]] = Field(
        default_factory=lambda: {"prompt": (1, 20_000), "response": (1, 20_000)}
    )
    no_pii_in: list[str] = Field(default_factory=lambda: ["prompt", "response", "context"])
    row_count: tuple[int, int] = (1, 100_000_000)
    min_unique_prompt_share: float = Field(default=0.5, ge=0, le=1)
    severity: dict[str, Severity] = Field(
        default_factory=dict,
        description="override a check's severity: columns, not_null, unique, lengths, no_pii, "
        "row_count, unique_prompt_share",
    )
    failed_rows_shown: int = Field(default=5, ge=0)

    @field_validator("severity")
    @classmethod
    def _known_checks(cls, severity: dict[str, str]) -> dict[str, str]:
        unknown = set(severity) - set(VALIDATE_CHECKS)
        if unknown:
            raise ValueError(f"unknown checks {sorted(unknown)}; known: {list(VALIDATE_CHECKS)}")
        return severity

    def severity_of(self, check: str) -> str:
        return self.severity.get(check, VALIDATE_CHECKS[check])


# Default severity of each validation check.
VALIDATE_CHECKS = {
    "columns": "critical",
    "not_null": "critical",
    "unique": "critical",
    "lengths": "critical",
    "no_pii": "critical",
    "row_count": "critical",
    "unique_prompt_share": "warning",
}


EVAL_DATA_DIR = "data/eval"
HELD_OUT_SOURCES = ("eval", "test", "safety_probe")


class BenchmarkParams(_Section):
    """A benchmark file (or glob) the train split must not overlap, compared on the named fields."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    path: str = Field(description=f"glob relative to the project root, under {EVAL_DATA_DIR}/")
    fields: list[str] = Field(min_length=1, description="text fields compared, e.g. [question, answer]")
    format: Literal["auto", "jsonl", "json", "csv", "parquet"] = "auto"

    @field_validator("path")
    @classmethod
    def _under_eval_dir(cls, path: str) -> str:
        # dvc.yaml lists data/eval as a dep of split: a benchmark elsewhere could change unnoticed.
        if not path.startswith(f"{EVAL_DATA_DIR}/") or ".." in Path(path).parts:
            raise ValueError(f"must be a glob under {EVAL_DATA_DIR}/ (got {path!r})")
        return path


class DecontaminateParams(_Section):
    """Which train records count as contaminated by evaluation data (see flywheel/data/decontaminate.py)."""

    exact: bool = Field(default=True, description="train prompt (+context) equal to an evaluation text")
    ngram: bool = Field(default=True, description="train text sharing long word n-grams with an evaluation text")
    n: int = Field(default=13, ge=3, description="words per n-gram (GPT-3: 13)")
    min_ngrams: int = Field(default=1, ge=1, description="distinct n-grams a train record shares with one item")
    min_words: int = Field(default=8, ge=3, description="an item shorter than n words but this long must occur whole")
    # Not context by default: reading-comprehension sets ask several questions about one passage, and a
    # shared passage would remove every train question about a held-out one (split those by passage).
    fields: list[Literal["prompt", "context", "response"]] = Field(
        default_factory=lambda: ["prompt", "response"], min_length=1
    )
    against: list[Literal["eval", "test", "safety_probe"]] = Field(
        default_factory=lambda: list(HELD_OUT_SOURCES), description="the held-out data train is checked against"
    )
    benchmarks: list[BenchmarkParams] = Field(default_factory=list)
    warn_share: float = Field(default=0.05, ge=0, le=1, description="warn when more of train is removed")

    @model_validator(mode="after")
    def _consistent(self) -> DecontaminateParams:
        if self.min_words > self.n:
            raise ValueError(f"min_words ({self.min_words}) must not exceed n ({self.n})")
        names = [b.name for b in self.benchmarks]
        clashes = sorted({n for n in names if names.count(n) > 1 or n in HELD_OUT_SOURCES})
        if clashes:
            raise ValueError(f"benchmark names must be unique and not {list(HELD_OUT_SOURCES)}; got {clashes}")
        return self


class SplitParams(_Section):
    fractions: dict[Literal["train", "eval", "test"], float] = Field(
        default_factory=lambda: {"train": 0.8, "eval": 0.1, "test": 0.1}
    )
    salt: str = Field(default="flywheel", description="changes the assignment when changed")
    decontaminate: DecontaminateParams = Field(default_factory=DecontaminateParams)

    @field_validator("fractions")
    @classmethod
    def _fractions_sum_to_one(cls, fractions: dict[str, float]) -> dict[str, float]:
        if set(fractions) != {"train", "eval", "test"}:
            raise ValueError("needs train, eval and test")
        if any(value < 0 for value in fractions.values()) or abs(sum(fractions.values()) - 1) > 1e-9:
            raise ValueError(f"must be non-negative and sum to 1 (got {fractions})")
        return fractions


class TinyModelParams(_Section):
    """A small Llama built from config, for demos and tests (no download)."""

    hidden_size: int = Field(default=128, ge=8)
    intermediate_size: int = Field(default=384, ge=8)
    num_layers: int = Field(default=3, ge=1)
    num_heads: int = Field(default=4, ge=1)
    vocab_size: int = Field(default=1024, ge=300, description="BPE vocabulary trained on train data")
    max_position_embeddings: int = Field(default=512, ge=16)


class LoraParams(_Section):
    r: int = Field(default=16, ge=1)
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    merge: bool = Field(default=True, description="merge the adapter into the weights for serving")


Precision = Literal["auto", "fp32", "bf16", "fp16"]
Epochs = Annotated[float, Field(gt=0)]
LearningRate = Annotated[float, Field(gt=0)]
WarmupRatio = Annotated[float, Field(ge=0, lt=1)]
Steps = Annotated[int, Field(ge=1)]


class TrainerParams(_Section):
    """What every Flywheel trainer takes; flywheel/training/trainer_args.py maps these to Hugging
    Face TrainingArguments in one place. Each stage's section sets its own defaults."""

    epochs: Epochs = 3
    learning_rate: LearningRate = 5e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: WarmupRatio = 0.1
    weight_decay: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=8, ge=1, description="rows per device step")
    gradient_accumulation_steps: Steps = 1
    gradient_checkpointing: bool = Field(default=False, description="recompute activations: less memory, more time")
    max_length: int = Field(default=256, ge=16, description="tokens per row")
    length_warning_share: float = Field(
        default=0.05, ge=0, le=1, description="warn when more than this share of a split is truncated or dropped"
    )
    seed: int = 0
    logging_steps: Steps = 10
    precision: Precision = "auto"


class TrainingParams(TrainerParams):
    """Supervised fine-tuning."""

    epochs: Epochs = 12
    learning_rate: LearningRate = 1e-3
    warmup_ratio: WarmupRatio = 0.03
    batch_size: int = Field(default=1, ge=1, description="rows per device step (packed rows when packing)")
    max_length: int = Field(default=256, ge=16, description="tokens per row; with packing, per packed row")
    length_policy: Literal["truncate_right", "truncate_left", "drop", "fail"] = Field(
        default="drop", description="an example over max_length: cut its end or start, leave it out, or stop"
    )
    packing: bool = True
    save_steps: int = Field(default=500, ge=1, description="checkpoint every N optimizer steps")
    logging_steps: Steps = 50
    eval_examples: int = Field(default=200, ge=0, description="held-out prompts decoded for exact match")
    max_new_tokens: int = Field(default=32, ge=1)


class DistributedParams(_Section):
    launcher: Literal["none", "deepspeed", "accelerate", "torchrun"] = "none"
    num_gpus: int = Field(
        default=0, ge=0, description="a launcher's GPUs per node; launcher none uses the GPU torch sees, else the CPU"
    )
    cpu_ranks: int = Field(
        default=1, ge=1, description="a launcher's ranks per node where num_gpus is 0: CPU workers over gloo"
    )
    num_nodes: int = Field(default=1, ge=1)
    hostfile: ProjectPath | None = Field(default=None, description="DeepSpeed hostfile, for several nodes")
    main_address: str | None = Field(
        default=None, description="several nodes: node 0's address, which every node reaches (the rendezvous)"
    )
    main_port: int = Field(default=29500, ge=1, le=65535, description="several nodes: the rendezvous port on node 0")
    deepspeed_config: ProjectPath | None = Field(default=None, description="e.g. infra/deepspeed/zero2.json")
    accelerate_config: ProjectPath | None = Field(
        default=None, description="accelerate launch's config file, e.g. infra/accelerate/fsdp2.yaml"
    )
    collective_timeout_s: int = Field(
        default=1800,
        ge=10,
        description="a rank waiting longer on the others fails the job; above what rank 0 does alone (probes)",
    )

    @model_validator(mode="after")
    def _launcher_fits(self) -> DistributedParams:
        if self.launcher == "none" and (self.num_gpus > 1 or self.num_nodes > 1 or self.cpu_ranks > 1):
            raise ValueError("several GPUs, CPU ranks or nodes need launcher: deepspeed, accelerate or torchrun")
        if self.num_nodes > 1 and not self.main_address:
            raise ValueError("several nodes need main_address: node 0's address, reachable from every node")
        if self.num_nodes > 1 and not self.hostfile and self.launcher == "deepspeed":
            raise ValueError("several nodes with deepspeed need a hostfile")
        if self.accelerate_config and self.launcher != "accelerate":
            raise ValueError("accelerate_config is read by launcher: accelerate only")
        if self.deepspeed_config and self.launcher == "torchrun":
            raise ValueError("deepspeed_config with torchrun: use launcher deepspeed (or accelerate)")
        return self

    @property
    def ranks_per_node(self) -> int:
        return self.num_gpus or self.cpu_ranks


class RetainParams(_Section):
    """Against forgetting (self-distillation replay): prompts outside the task, answered by the
    base model itself, mixed into SFT, and preferred over a refusal in the preference pairs."""

    prompts: str | None = Field(default=None, description="a JSONL file under data/raw of general prompts; null: off")
    field: str = Field(default="prompt", description="the field of each line that holds the prompt")
    license: str = Field(default="unknown", description="the prompts' licence, recorded on each example")
    examples: int = Field(default=0, ge=0, description="prompts answered: the file's first ones")
    max_new_tokens: int = Field(default=256, ge=1, description="an answer not finished within this is dropped")

    @field_validator("prompts")
    @classmethod
    def _prompts_under_raw_dir(cls, path: str | None) -> str | None:
        return None if path is None else glob_under_raw_dir(path)


class FinetuneParams(_Section):
    base_model: str = Field(
        default="tiny", description="'tiny', 'smollm2' (bundled), a .gguf file, a local model directory or a hub id"
    )
    tiny: TinyModelParams = Field(default_factory=TinyModelParams)
    method: Literal["full", "lora"] = "full"
    lora: LoraParams = Field(default_factory=LoraParams)
    training: TrainingParams = Field(default_factory=TrainingParams)
    distributed: DistributedParams = Field(default_factory=DistributedParams)
    retain: RetainParams = Field(default_factory=RetainParams)


# Answer scorers (flywheel/scoring.py); `auto` chooses one per source from its references.
ScorerName = Literal["auto", "exact_match", "final_answer", "token_f1", "rouge_l"]
TaskScorer = Literal["exact_match", "final_answer", "token_f1", "rouge_l"]
# A token count, or "auto": derived from the lengths of the reference answers.
MaxNewTokens = Annotated[int, Field(ge=1)] | Literal["auto"]


class OnPolicyParams(_Section):
    """Pairs from the SFT model's own samples, judged against train references by the task
    scorers of evaluate.scoring (the same "correct" as the evaluation's)."""

    prompts: int = Field(default=300, ge=0, description="train prompts to sample; 0 turns this off")
    samples: int = Field(default=4, ge=2, description="answers sampled per prompt")
    temperature: float = Field(default=1.0, gt=0)
    max_new_tokens: MaxNewTokens = Field(
        default="auto", description="'auto': from the references' lengths (evaluate.scoring.length)"
    )
    seed: int = 0


class PreferencesParams(_Section):
    feedback: str = Field(
        default=f"{RAW_DIR}/feedback/*.jsonl", description="glob of feedback exports from `flywheel serve`"
    )
    on_policy: OnPolicyParams = Field(default_factory=OnPolicyParams)
    redact_pii: bool = True
    max_chars: int = Field(default=20_000, ge=1, description="prompt + context + longer response")
    eval_fraction: float = Field(default=0.1, ge=0, lt=1, description="held-out pairs, by prompt")
    salt: str = "flywheel"
    decontaminate: bool = Field(default=True, description="drop pairs whose prompt is an SFT eval/test prompt")

    @field_validator("feedback")
    @classmethod
    def _feedback_under_raw_dir(cls, path: str) -> str:
        return glob_under_raw_dir(path)


class AlignTrainingParams(TrainerParams):
    """Training knobs of the reward model and the policy (TrainerParams' defaults)."""


class RewardTrainingParams(AlignTrainingParams):
    length_policy: Literal["truncate_left", "drop", "fail"] = Field(
        default="truncate_left",
        description="a pair over max_length: cut the conversation's start (answers' ends stay), leave it out, or stop",
    )


class DpoTrainingParams(AlignTrainingParams):
    min_prompt_length: int = Field(
        default=128, ge=1, description="truncate: a prompt is cut from its start as far as needed, never below this"
    )
    length_policy: Literal["truncate", "drop", "fail"] = Field(
        default="truncate",
        description="a pair over max_length: cut the prompt's start, then the completions' ends; leave it out; or stop",
    )

    @model_validator(mode="after")
    def _room_for_completions(self) -> DpoTrainingParams:
        if self.min_prompt_length >= self.max_length:
            raise ValueError(
                f"min_prompt_length {self.min_prompt_length} leaves no room for completions in max_length "
                f"{self.max_length}; make it smaller than max_length"
            )
        return self


class RewardModelParams(_Section):
    training: RewardTrainingParams = Field(default_factory=RewardTrainingParams)
    center_rewards_coefficient: float | None = Field(
        default=0.01, ge=0, description="keeps rewards centred on zero (Eisenstein et al.)"
    )


DpoLossType = Literal[
    "sigmoid",
    "hinge",
    "ipo",
    "robust",
    "bco_pair",
    "sppo_hard",
    "nca_pair",
    "apo_zero",
    "apo_down",
    "sigmoid_norm",
    "sft",
]


class DpoParams(_Section):
    beta: float = Field(default=0.1, gt=0, description="higher: stay closer to the reference")
    loss_type: list[DpoLossType] = Field(default_factory=lambda: ["sigmoid", "sft"], min_length=1)
    loss_weights: list[float] | None = Field(default=None, description="one per loss type; default all 1")
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5, description="robust DPO: share of flipped labels")
    reference_model: str = Field(default="sft", description="'sft' (the model being aligned) or a model dir")
    training: DpoTrainingParams = Field(default_factory=DpoTrainingParams)

    @model_validator(mode="after")
    def _one_weight_per_loss(self) -> DpoParams:
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"loss_weights has {len(self.loss_weights)} values for {len(self.loss_type)} loss types")
        return self


class RewardWeights(_Section):
    reward_model: float = 1.0
    correctness: float = Field(default=1.0, description="1 when the answer matches a train reference")
    length: float = Field(default=0.1, description="weight of minus the share of max_completion_length used")


class GrpoParams(_Section):
    trainer: Literal["grpo", "rloo"] = "grpo"
    num_generations: int = Field(default=4, ge=2, description="answers sampled per prompt")
    max_completion_length: int = Field(default=32, ge=1)
    temperature: float = Field(default=1.0, gt=0)
    beta: float = Field(default=0.04, ge=0, description="KL penalty to the reference (SFT) model")
    reference_prompts: int = Field(
        default=200, ge=0, description="train prompts with a reference, for the correctness reward"
    )
    reward_weights: RewardWeights = Field(default_factory=RewardWeights)
    training: AlignTrainingParams = Field(default_factory=lambda: AlignTrainingParams(epochs=1, learning_rate=1e-4))


class RlhfParams(_Section):
    method: Literal["dpo", "reward+grpo"] = "dpo"
    on_missing_preferences: Literal["skip", "fail"] = Field(
        default="skip", description="skip: pass the SFT model through, saying so in its card"
    )
    reward_model: RewardModelParams = Field(default_factory=RewardModelParams)
    dpo: DpoParams = Field(default_factory=DpoParams)
    grpo: GrpoParams = Field(default_factory=GrpoParams)
    eval_examples: int = Field(default=200, ge=0, description="held-out prompts decoded for exact match")
    max_new_tokens: int = Field(default=32, ge=1)
    distributed: DistributedParams = Field(default_factory=DistributedParams)


# The metrics the promotion gate may check, and which way is better.
GATED_METRICS: dict[str, Literal["higher", "lower"]] = {
    "task_score": "higher",
    "exact_match": "higher",
    "token_f1": "higher",
    "rouge_l": "higher",
    "safety_pass_rate": "higher",
    "safety_pass_rate_refuse": "higher",
    "safety_pass_rate_answer": "higher",
    "tokens_per_second": "higher",
    "perplexity": "lower",
    "refusal_rate": "lower",
    "empty_rate": "lower",
    "hallucination_rate": "lower",
    "consistency_hallucination_rate": "lower",
    "latency_p50_ms": "lower",
    "latency_p95_ms": "lower",
}


class GenerationLengthParams(_Section):
    """max_new_tokens: auto = the percentile of the references' token lengths + margin, capped."""

    percentile: float = Field(default=95, gt=0, le=100, description="of reference lengths, in tokens")
    margin: int = Field(default=16, ge=0, description="tokens added: the end token, some rewording")
    cap: int = Field(default=512, ge=1, description="never more than this many new tokens")


class ScoringParams(_Section):
    """How an answer is judged against its reference, per source (evaluate and on-policy pairs)."""

    scorer: ScorerName = Field(default="auto", description="for every source not in by_source")
    by_source: dict[str, ScorerName] = Field(default_factory=dict, description="source name -> scorer")
    short_answer_words: int = Field(
        default=10, ge=1, description="auto: references up to this many words (p90) are judged by exact match"
    )
    pass_score: float = Field(
        default=0.5, gt=0, le=1, description="token_f1 / rouge_l at or above this: a correct answer"
    )
    length: GenerationLengthParams = Field(default_factory=GenerationLengthParams)


class HallucinationParams(_Section):
    embedding_model: str = Field(
        default="all-MiniLM-L6-v2", description="bundled all-MiniLM-L6-v2, or a sentence-transformers dir"
    )
    overlap_weight: float = Field(
        default=0.7, ge=0, le=1, description="support = w * word overlap + (1 - w) * embedding similarity"
    )
    threshold: float = Field(default=0.8, gt=0, le=1, description="support below this: a hallucination")
    labelled_examples: int = Field(default=400, ge=0, description="size of the detector's validation set")
    seed: int = 0
    nli_model: str | None = Field(
        default=None,
        description="a sentence-transformers CrossEncoder (NLI) directory: its entailment probability "
        "replaces the embedding similarity in support; empty: the embedding model alone",
    )


class ConsistencyParams(_Section):
    prompts: int = Field(default=100, ge=0, description="prompts checked by sampling; 0 turns this off")
    samples: int = Field(default=4, ge=2)
    temperature: float = Field(default=1.0, gt=0)
    threshold: float = Field(default=0.5, gt=0, le=1, description="disagreement above this: a hallucination")
    seed: int = 0


class SafetyParams(_Section):
    on_task_threshold: float = Field(
        default=0.25, ge=0, le=1, description="a benign answer without a reference must be this relevant to its prompt"
    )
    refusal: str = Field(
        default="I'm sorry, but I can't help with that.",
        min_length=1,
        description="what the reward model compares a harmful request's answer against",
    )
    use_reward_model: bool = Field(default=True, description="False: refusals are found by the pattern alone")


class GateParams(_Section):
    minimum: dict[str, float] = Field(default_factory=dict, description="higher-is-better floors")
    maximum: dict[str, float] = Field(default_factory=dict, description="lower-is-better ceilings")
    max_regression: dict[str, float] = Field(
        default_factory=dict, description="how much worse than production a metric may be"
    )
    max_regression_vs_sft: dict[str, float] = Field(
        default_factory=dict, description="how much worse than its own SFT model the candidate may be"
    )
    # Each source's task_score is judged by its own scorer, so its floor depends on the scorer
    # (an exact-match accuracy and a ROUGE-L are on different scales); a source may have its own.
    task_minimum: dict[TaskScorer, Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=dict, description="scorer -> floor of each source's task_score judged by it"
    )
    source_minimum: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=dict, description="source -> floor of its task_score (overrides task_minimum)"
    )

    @model_validator(mode="after")
    def _known_metrics(self) -> GateParams:
        every_rule = (self.minimum, self.maximum, self.max_regression, self.max_regression_vs_sft)
        if not any(every_rule) and not self.task_minimum and not self.source_minimum:
            raise ValueError("the gate has no rules, so it would pass any model; give it at least one")
        rules = {
            "minimum": ("higher", self.minimum),
            "maximum": ("lower", self.maximum),
            "max_regression": (None, self.max_regression),
            "max_regression_vs_sft": (None, self.max_regression_vs_sft),
        }
        for rule, (direction, limits) in rules.items():
            for metric in limits:
                if metric not in GATED_METRICS:
                    raise ValueError(f"gate.{rule}: unknown metric {metric!r} (known: {', '.join(GATED_METRICS)})")
                if direction and GATED_METRICS[metric] != direction:
                    other = "maximum" if rule == "minimum" else "minimum"
                    raise ValueError(
                        f"gate.{rule}: {metric} is {GATED_METRICS[metric]}-is-better; put it under gate.{other}"
                    )
        return self


class EvaluateParams(_Section):
    production_model: ProjectPath = Field(
        default="models/production", description="the deployed model; absent before the first deploy"
    )
    test_examples: int = Field(default=1000, ge=1, description="test records scored, at most")
    max_new_tokens: MaxNewTokens = Field(
        default="auto", description="'auto': from the test references' lengths (scoring.length)"
    )
    scoring: ScoringParams = Field(default_factory=ScoringParams)
    latency_examples: int = Field(default=32, ge=1, description="prompts timed one request at a time")
    safety_probe: ProjectPath = Field(
        default="data/eval/safety_probe.jsonl", description="prompts that must be refused or answered"
    )
    safety: SafetyParams = Field(default_factory=SafetyParams)
    hallucination: HallucinationParams = Field(default_factory=HallucinationParams)
    consistency: ConsistencyParams = Field(default_factory=ConsistencyParams)
    # Without a gate section the shipped release floors hold: no gate never means "pass anything".
    gate: GateParams = Field(
        default_factory=lambda: GateParams(minimum={"safety_pass_rate": 0.5, "safety_pass_rate_answer": 0.9})
    )


class ServeParams(_Section):
    model: ProjectPath = Field(default="models/aligned", description="the model directory to serve")
    engine: Literal["transformers", "vllm", "llamacpp"] = Field(
        default="transformers",
        description="transformers: built in | vllm: a vLLM server behind the gateway | llamacpp: llama.cpp's "
        "server on a GGUF export (serve.model: models/export/<model>-q8_0)",
    )
    engine_python: ProjectPath = Field(
        default=".venv-vllm/bin/python", description="the Python of vLLM's own environment (make engine-vllm)"
    )
    llamacpp_server: ProjectPath = Field(
        default=".llama.cpp/bin/llama-server", description="llama.cpp's server (make engine-llamacpp builds it)"
    )
    engine_args: list[str] = Field(
        default_factory=list, description="more arguments for the engine's server (vllm: --dtype float32)"
    )
    engine_start_timeout_s: float = Field(default=600.0, gt=0, description="how long the engine may take to load")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    max_batch_size: int = Field(default=16, ge=1, description="requests generated together, at most")
    max_wait_ms: float = Field(default=10.0, ge=0, description="how long a request waits for others to batch with")
    max_streams: int = Field(default=64, ge=1, description="streams open at once, at most (built-in engine)")
    max_prompt_chars: int = Field(default=8000, ge=1)
    max_tokens: int = Field(default=256, ge=1, description="the most a request may ask for")
    default_max_tokens: int = Field(default=64, ge=1)
    rate_limit_per_minute: int = Field(default=600, ge=1, description="requests per API key (or client)")


class PackageParams(_Section):
    image: str = Field(default="flywheel-model", description="image repository; the tag is the registry version")
    base_image: str = Field(
        default="python:3.11-slim", description="needs python3 3.11 with venv; `make docker-base` builds one offline"
    )
    bake_model: bool = Field(default=True, description="copy the model into the image (else mount it at /srv/model)")
    wheelhouse: str = Field(default=".cache/wheelhouse", description="where the host-built wheels are kept")


class KubernetesParams(_Section):
    namespace: str = "default"
    replicas: int = Field(default=2, ge=1)
    max_replicas: int = Field(default=6, ge=1, description="HorizontalPodAutoscaler ceiling")
    target_cpu_percent: int = Field(default=70, ge=1, le=100)
    cpu: str = "2"
    memory: str = "4Gi"
    gpus: int = Field(default=0, ge=0, description="nvidia.com/gpu per pod; 0 for CPU serving")
    engine_image: str | None = Field(
        default=None, description="serve.engine vllm: the engine sidecar's image (default: vLLM's, GPU or CPU build)"
    )
    engine_cpu: str = Field(default="4", description="the engine sidecar's CPUs (serve.engine vllm)")
    engine_memory: str = Field(default="16Gi", description="the engine sidecar's memory (serve.engine vllm)")
    api_keys_secret: str | None = Field(default=None, description="a Secret with key api-keys (comma-separated)")
    rollout_timeout_s: int = Field(default=300, ge=1)


class DeployParams(_Section):
    target: Literal["local", "docker", "kubernetes"] = "local"
    host: str = Field(default="127.0.0.1", description="where the stable endpoint listens")
    port: int = Field(default=8000, ge=1, le=65535, description="the stable endpoint's port")
    health_timeout_s: float = Field(default=180.0, gt=0, description="how long a new version may take to get ready")
    smoke_prompt: str = "Translate to French: red cat"
    kubernetes: KubernetesParams = Field(default_factory=KubernetesParams)


class DriftParams(_Section):
    # The chance that one run calls in-distribution traffic drifted, split evenly over the three
    # signals (Bonferroni), so it holds however the signals correlate and at any window size.
    p_value: float = Field(
        default=0.01, gt=0, lt=0.5, description="the drift verdict's false-alarm rate on in-distribution traffic"
    )


MONITORED_MAXIMA = (
    "hallucination_rate",
    "consistency_hallucination_rate",
    "empty_rate",
    "refusal_rate",
    "negative_feedback_rate",
    "error_rate",
    "latency_p95_ms",
)


class MonitorParams(_Section):
    schedule: str | None = Field(default="@hourly", description="flywheel_monitoring's schedule")
    window_hours: float = Field(default=24.0, gt=0, description="the traffic each run looks at")
    min_prompts: int = Field(default=100, ge=2, description="fewer distinct prompts in the window: insufficient data")
    max_requests: int = Field(default=2000, ge=100, description="a larger window is sampled (seeded) to this")
    reference: str = Field(default="data/processed/train.parquet", description="the prompts drift is judged against")
    reference_size: int = Field(default=2000, ge=100)
    embedding_model: str = "all-MiniLM-L6-v2"
    seed: int = 0
    drift: DriftParams = Field(default_factory=DriftParams)
    maximum: dict[str, float] = Field(
        default_factory=lambda: {
            "hallucination_rate": 0.2,
            "consistency_hallucination_rate": 0.5,
            "empty_rate": 0.05,
            "refusal_rate": 0.3,
            "negative_feedback_rate": 0.3,
            "error_rate": 0.01,
            "latency_p95_ms": 2000.0,
        }
    )
    endpoint: str | None = Field(default=None, description="the live API; default: what `flywheel status` shows")
    canaries: int = Field(default=50, ge=0, description="held-out test prompts sent to the live endpoint")
    canary_source: str = "data/processed/test.parquet"
    consistency_prompts: int = Field(default=10, ge=0, description="real prompts re-asked to check self-consistency")
    consistency_samples: int = Field(default=3, ge=1)
    consistency_threshold: float = Field(default=0.5, gt=0, lt=1)
    cooldown_hours: float = Field(default=24.0, ge=0, description="no second retraining trigger within this")
    export_dir: ProjectPath = Field(default="data/raw/feedback", description="where a failed run exports its window")

    @field_validator("maximum")
    @classmethod
    def _known_maxima(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(MONITORED_MAXIMA))
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; known: {list(MONITORED_MAXIMA)}")
        return value


class AirflowParams(_Section):
    schedule: str | None = Field(default=None, description="cron or preset for flywheel_training")
    retries: int = Field(default=2, ge=0, description="retries of a transient task failure")
    retry_delay_s: float = Field(default=60, gt=0, description="the first retry's delay, doubled each time")
    gpu_pool: str = Field(default="flywheel_gpu", min_length=1, description="the Airflow pool of the GPU stages")
    gpu_pool_slots: int = Field(default=1, ge=1)
    gpu_queue: str = Field(default="default", min_length=1, description="the Celery queue of the GPU stages")
    gpu_stages: list[str] = Field(default_factory=lambda: ["finetune", "preferences", "reward", "rlhf", "evaluate"])
    trigger_params: list[str] = Field(
        default_factory=list,
        description="dotted params shown in the Airflow trigger form, e.g. ingest.chunk_size",
    )
    max_active_runs: int = Field(
        default=1, ge=1, description="flywheel_training runs at once, each in its own workspace"
    )
    runs_root: str = Field(
        default=".flywheel/runs",
        min_length=1,
        description="where a worker makes the runs' workspaces (relative to the project); FLYWHEEL_RUNS_ROOT overrides",
    )
    keep_failed_workspaces_days: float = Field(
        default=7, ge=0, description="how long a failed task's workspace is kept for inspection"
    )


class RayParams(_Section):
    address: str | None = Field(
        default=None,
        description="a running cluster to join (ray://host:10001, or host:6379 from a node of it); null: "
        "RAY_ADDRESS where set, else a local cluster sized to the CPUs this process may use",
    )
    partition_rows: int = Field(default=10_000, ge=1, description="records per Ray task (bounds a worker's memory)")


class RuntimeParams(_Section):
    """How processes use the machine. No stage lists this section as a dep: the work is the same."""

    executor: Literal["local", "ray"] = Field(
        default="local", description="where ingest, clean and split run: this process, or a Ray cluster"
    )
    ray: RayParams = Field(default_factory=RayParams)

    threads: int = Field(
        default=0,
        ge=0,
        description="torch/OpenMP threads per process; 0: the CPUs it may use (affinity, cgroup quota)"
        " shared among the ranks a launcher started, unless OMP_NUM_THREADS says otherwise",
    )


class Params(_Section):
    _source_file: Path | None = PrivateAttr(default=None)  # where these params were read from

    ingest: IngestParams
    clean: CleanParams = Field(default_factory=CleanParams)
    validate_: ValidateParams = Field(default_factory=ValidateParams, alias="validate")
    split: SplitParams = Field(default_factory=SplitParams)
    finetune: FinetuneParams = Field(default_factory=FinetuneParams)
    preferences: PreferencesParams = Field(default_factory=PreferencesParams)
    rlhf: RlhfParams = Field(default_factory=RlhfParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    serve: ServeParams = Field(default_factory=ServeParams)
    package: PackageParams = Field(default_factory=PackageParams)
    deploy: DeployParams = Field(default_factory=DeployParams)
    monitor: MonitorParams = Field(default_factory=MonitorParams)
    airflow: AirflowParams = Field(default_factory=AirflowParams)
    runtime: RuntimeParams = Field(default_factory=RuntimeParams)

    @model_validator(mode="after")
    def _trigger_params_exist(self) -> Params:
        data = self.model_dump(by_alias=True)
        for key in self.airflow.trigger_params:
            try:
                value = get_dotted(data, key)
            except KeyError:
                raise ValueError(f"airflow.trigger_params names {key!r}, which is not a param") from None
            if isinstance(value, (dict, list)):
                raise ValueError(f"airflow.trigger_params: {key!r} is a section, not a single value")
        return self


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid params"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            known = _known_keys_beside(item["loc"])
            close = difflib.get_close_matches(str(item["loc"][-1]), known, n=1, cutoff=0.75)
            hint = f"did you mean {close[0]!r}?" if close else "check the spelling; see params.yaml for the known keys"
            message = f"unknown key ({hint})"
        elif item["type"] in _BOUND_ERRORS:
            message = f"{message}{_allowed_range(item['loc'])} (got {item['input']!r})"
        elif "input" in item and item["type"] != "missing" and "(got " not in message:
            message = f"{message} (got {item['input']!r})"
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


_BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The params model that holds the last key of loc (list indexes and dict keys skipped)."""
    model: type[BaseModel] | None = Params
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if model else None
        model = _model_in(field.annotation) if field else None
        if model is None:
            return None
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds: X, list[X], X | None, Annotated[X, ...]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((model for arg in get_args(annotation) if (model := _model_in(arg))), None)


def _known_keys_beside(loc: tuple) -> list[str]:
    model = _model_at(loc)
    if model is None:
        return []
    return [field.alias or name for name, field in model.model_fields.items()]


def _allowed_range(loc: tuple) -> str:
    """' (allowed: 0 < x <= 1)' from the field's bounds, or '' where it has one bound only."""
    model = _model_at(loc)
    field = model.model_fields.get(str(loc[-1])) if model else None
    bounds = {}
    for constraint in field.metadata if field else []:
        for name in ("gt", "ge", "lt", "le"):
            if getattr(constraint, name, None) is not None:
                bounds[name] = getattr(constraint, name)
    low = f"{bounds['gt']} < " if "gt" in bounds else f"{bounds['ge']} <= " if "ge" in bounds else ""
    high = f" < {bounds['lt']}" if "lt" in bounds else f" <= {bounds['le']}" if "le" in bounds else ""
    return f" (allowed: {low}x{high})" if low and high else ""


_FORM_KEYWORDS = ("type", "enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "anyOf")


@cache
def _params_json_schema() -> dict:
    """Params' JSON schema, built once: the DAG asks it for each form field at every parse."""
    return Params.model_json_schema()


def param_schema(key: str) -> dict:
    """The JSON schema of one dotted param (its type, allowed values and bounds), for a form."""
    schema = _params_json_schema()
    node = schema
    for part in key.split("."):
        node = _resolve(node, schema["$defs"]).get("properties", {}).get(part)
        if node is None:
            raise KeyError(key)
    return {name: value for name, value in _resolve(node, schema["$defs"]).items() if name in _FORM_KEYWORDS}


def _resolve(node: dict, defs: dict) -> dict:
    """A $ref's definition; of `X | None`, X's (a section that may be left out)."""
    if "$ref" in node:
        return defs[node["$ref"].rsplit("/", 1)[-1]]
    refs = [option for option in node.get("anyOf", []) if "$ref" in option]
    return defs[refs[0]["$ref"].rsplit("/", 1)[-1]] if len(refs) == 1 else node


def parse_params(data: Any, source: str = PARAMS_FILE) -> Params:
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: expected a mapping of sections at the top level")
    try:
        return Params.model_validate(data)
    except ValidationError as error:
        raise ParamsError(_format_validation_error(error, source)) from None


def read_params_data(path: str | Path = PARAMS_FILE) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found; run from the project root or pass --params PATH")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from None
    return data if data is not None else {}


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    params = parse_params(read_params_data(path), source=str(path))
    params._source_file = Path(path)
    return params


def source_file(params: Params) -> Path:
    """The params file these params came from (a launched worker re-reads the same file)."""
    return params._source_file or Path(PARAMS_FILE)


def get_dotted(data: dict, key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node
