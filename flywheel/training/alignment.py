"""What the reward and rlhf stages share: the preference pairs as chat messages, loading the SFT
model, scoring with the reward model, lineage, and what to do when there is no preference data."""

from __future__ import annotations

from pathlib import Path

from flywheel import modeling, paths
from flywheel.config import RlhfParams
from flywheel.errors import FlywheelError
from flywheel.io import read_records

# ---------------------------------------------------------------------------------------------
# Pairs


def load_pairs(root: Path) -> tuple[list[dict], list[dict]]:
    """(train, eval) preference pairs."""
    train, held_out = (artifact.require(root) for artifact in paths.PREFERENCE_SPLITS.values())
    return read_records(train), read_records(held_out)


def prompt_messages(pair: dict) -> list[dict]:
    """The conversation a pair's responses answer (system, earlier turns, the prompt)."""
    return modeling.record_messages(pair, with_response=False)


def as_conversational(pair: dict) -> dict:
    """A pair in TRL's conversational preference format."""
    return {
        "prompt": prompt_messages(pair),
        "chosen": [{"role": "assistant", "content": pair["chosen"]}],
        "rejected": [{"role": "assistant", "content": pair["rejected"]}],
    }


def chosen_wins(pairs: list[dict], score) -> list[bool]:
    """For each pair, whether its chosen response scores above its rejected one;
    score(prompts, responses) gives one number per (conversation, response)."""
    prompts = [prompt_messages(pair) for pair in pairs]
    chosen = score(prompts, [pair["chosen"] for pair in pairs])
    rejected = score(prompts, [pair["rejected"] for pair in pairs])
    return [c > r for c, r in zip(chosen, rejected)]


def share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def share_by_source(pairs: list[dict], flags: list[bool]) -> dict[str, float | None]:
    return {
        source: share([flag for pair, flag in zip(pairs, flags) if pair["source"] == source])
        for source in sorted({pair["source"] for pair in pairs})
    }


def no_pairs(config: RlhfParams, stage: str) -> str:
    """The reason to skip when there are no pairs to train on; raises when params say fail."""
    reason = "no preference pairs to train on (see metrics/preferences.json)"
    if config.on_missing_preferences == "fail":
        raise FlywheelError(
            f"{stage}: {reason}; add preference data or feedback, or set rlhf.on_missing_preferences: skip"
        )
    print(f"{stage}: {reason}; skipping, as rlhf.on_missing_preferences says", flush=True)
    return reason


# ---------------------------------------------------------------------------------------------
# Models


def load_sft(root: Path):
    return modeling.load_pretrained(str(paths.SFT_MODEL.require(root)))


def load_reward_model(root: Path):
    """(model, tokenizer) of the trained reward model, or None where none was trained."""
    return modeling.load_reward_model(root / paths.REWARD_MODEL)


def score_answers(model, tokenizer, prompts: list[list[dict]], answers: list[str]) -> list[float]:
    """The reward of each answer to its conversation."""
    return modeling.reward_scores(
        model,
        tokenizer,
        [prompt + [{"role": "assistant", "content": answer}] for prompt, answer in zip(prompts, answers)],
    )


def lineage(root: Path) -> dict:
    """Where a reward or aligned model came from: the SFT model and preference files (md5s, as
    in dvc.lock) and the code revision."""
    return {
        "started_from": {
            "path": str(paths.SFT_MODEL),
            "md5": modeling.file_md5(root / paths.SFT_MODEL / "model.safetensors"),
        },
        "data": {
            f"preferences_{name}": {"path": str(artifact), "md5": modeling.file_md5(root / artifact)}
            for name, artifact in paths.PREFERENCE_SPLITS.items()
        },
        "code_revision": modeling.code_revision(root),
    }
