"""SmolLM2-135M-Instruct on this machine's CPUs: LoRA SFT and generation tokens/s, fp32 against
bf16, side by side in one run, with the training loss each reaches from the same start.

    python benchmarks/real_model.py [--steps 40] [--threads N]

SFT: the bundled sample's translations in SmolLM2's chat template, packed into rows of 256 tokens,
LoRA (r 16) on every attention and MLP projection, AdamW at 1e-3; the same rows, the same
initial adapter and the same step count in fp32 and under bf16 autocast (AMX-BF16 / AVX512-BF16
where the CPU has them). Loss is the mean over the last quarter of the steps.
Generation: greedy answers of 64 new tokens to 16 prompts, one request at a time and as one
batch of 16, with fp32 weights, bf16 autocast and bf16 weights.
Goal (issue 19): report both; keep the faster precision where the loss is the same.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sample_conversations(count: int) -> list[list[dict]]:
    conversations = []
    # The sample keeps a few broken lines on purpose (ingest quarantines them): skipped here.
    for line in (ROOT / "data/raw/sample/translations.jsonl").open(errors="replace"):
        try:
            row = json.loads(line)
            pair = [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
        except (ValueError, KeyError, TypeError):
            continue
        if all(isinstance(turn["content"], str) and turn["content"] for turn in pair):
            conversations.append(pair)
    return conversations[:count]


def packed_rows(tokenizer, conversations, width: int) -> list[tuple[list[int], list[int]]]:
    from flywheel.training import lengths

    rows, ids, labels = [], [], []
    for example_ids, example_labels in lengths.sft_tokens(tokenizer, conversations):
        if len(ids) + len(example_ids) > width:
            rows.append((ids, labels))
            ids, labels = [], []
        ids, labels = ids + example_ids, labels + example_labels
    return rows


def train(model, rows, steps: int, bf16: bool) -> tuple[float, float]:
    """(tokens per second, mean loss over the last quarter of the steps)."""
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses, tokens, seconds = [], 0, 0.0
    for step in range(steps):
        ids, labels = rows[step % len(rows)]
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step:  # the first step warms the kernels up
            seconds += time.perf_counter() - started
            tokens += len(ids)
        losses.append(loss.item())
    tail = losses[-max(1, steps // 4) :]
    return tokens / seconds, sum(tail) / len(tail)


def generation(model, tokenizer, prompts, batch_size: int, bf16_autocast: bool) -> float:
    import torch

    from flywheel import modeling

    started = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_autocast):
        answers = modeling._decode_new(
            model, tokenizer, prompts, batch_size, max_new_tokens=64, min_new_tokens=64, do_sample=False
        )
    return sum(count for _, count in answers) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=0, help="0: the CPUs this process may use")
    args = parser.parse_args()

    from flywheel import threads

    threads.configure(args.threads)
    import torch
    from peft import LoraConfig, get_peft_model

    from flywheel import modeling
    from flywheel.training import base

    capability = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability {capability}")
    model, tokenizer = base.load_gguf(base.bundled_file("smollm2")[0])
    modeling.with_generation_markers(tokenizer)
    rows = packed_rows(tokenizer, sample_conversations(2000), 256)
    torch.manual_seed(0)
    adapter = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules=TARGETS)
    lora = get_peft_model(copy.deepcopy(model), adapter)
    start = copy.deepcopy(lora.state_dict())

    print(f"\nLoRA SFT, {args.steps} steps of one packed row of <= 256 tokens")
    print(f"{'precision':12}{'tokens/s':>10}{'loss':>8}")
    for name, bf16 in (("fp32", False), ("bf16 autocast", True)):
        lora.load_state_dict(start)
        speed, loss = train(lora, rows, args.steps, bf16)
        print(f"{name:12}{speed:>10.0f}{loss:>8.3f}")

    prompts = [[{"role": "user", "content": c[0]["content"]}] for c in sample_conversations(16)]
    print("\ngeneration, greedy, 64 new tokens per answer (tokens/s)")
    print(f"{'weights':24}{'1 at a time':>12}{'batch of 16':>12}")
    bf16_weights = copy.deepcopy(model).to(torch.bfloat16)
    for name, subject, autocast in (
        ("fp32", model, False),
        ("fp32, bf16 autocast", model, True),
        ("bf16", bf16_weights, False),
    ):
        single = generation(subject, tokenizer, prompts[:4], 1, autocast)
        batched = generation(subject, tokenizer, prompts, 16, autocast)
        print(f"{name:24}{single:>12.1f}{batched:>12.1f}")


if __name__ == "__main__":
    main()
