"""The engine that answers requests: the loaded model, its batcher and its generation metrics.

Generation runs on one worker thread (flywheel/serving/batching.py); concurrent requests that
decode the same way are generated together.
"""

from __future__ import annotations

from pathlib import Path

from flywheel import modeling, paths
from flywheel.config import ServeParams


class Engine:
    def __init__(self, config: ServeParams, model_dir: Path, registry):
        from prometheus_client import Counter, Histogram

        from flywheel.serving import batching

        modeling.require_model(model_dir)
        self.model, self.tokenizer = modeling.load_pretrained(str(model_dir))
        self.model.eval()
        self.name = model_dir.name
        self.version = modeling.model_version(model_dir)
        self.batch_sizes = Histogram(
            "flywheel_batch_size", "requests per generated batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=registry
        )
        self.tokens = Counter("flywheel_generated_tokens", "tokens generated", registry=registry)
        self.generation_seconds = Counter(
            "flywheel_generation_seconds",
            "seconds spent generating (tokens/s = rate of tokens / rate of this)",
            registry=registry,
        )

        def record(size, tokens, seconds):
            self.batch_sizes.observe(size)
            self.tokens.inc(tokens)
            self.generation_seconds.inc(seconds)

        self.batcher = batching.Batcher(
            lambda jobs: batching.generate_batch(self.model, self.tokenizer, jobs),
            max_batch_size=config.max_batch_size,
            max_wait_ms=config.max_wait_ms,
            on_batch=record,
        )

    @property
    def ids(self) -> list[str]:
        """The names a request may give in `model`: the directory's, the version, the stable name."""
        return list(dict.fromkeys([self.name, self.version, paths.MODEL_NAME]))

    @property
    def context_tokens(self) -> int:
        """How many tokens the model attends to: prompt and answer together."""
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 2**31)

    def prompt_tokens(self, prompt: str) -> int:
        return len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def chat_prompt(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
