"""SFT training throughput: sequence packing against plain padding, and (on a GPU) MFU.

    python benchmarks/train_throughput.py [--examples 1500]
    python benchmarks/train_throughput.py --mfu        # on a CUDA GPU: ~1B Llama, bf16, seq 2048

Packing vs padding: the same variable-length examples (8 to 400 words, log-uniform), the same
tiny Llama and tokenizer, one epoch each through TRL's SFTTrainer: with packing (best-fit
decreasing into rows, no padding) and with padding each batch to its longest example, at three
sizes where a packed row and a padded batch hold about as many examples. Both count real
(non-padding) tokens per second of training. Goal (issue #4): >= 1.8x from packing.

MFU: model FLOPs utilisation of SFT steps of a ~1B-parameter Llama built from config, bf16, sequence
length 2048: achieved FLOPs (6 x parameters x tokens, plus attention) over the GPU's dense bf16 peak.
Goal (issue #4): >= 40% on one H100.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = (
    "river stone cloud apple window train music garden paper silver morning letter forest "
    "engine market planet candle bridge winter harbor yellow quiet rapid gentle"
).split()


def variable_length_examples(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        words = rng.choices(WORDS, k=int(math.exp(rng.uniform(math.log(8), math.log(400)))))
        half = max(1, len(words) // 2)
        examples.append(
            {
                "messages": [
                    {"role": "user", "content": "Continue: " + " ".join(words[:half])},
                    {"role": "assistant", "content": " ".join(words[half:]) or "done"},
                ]
            }
        )
    return examples


def train_once(examples: list[dict], packing: bool, max_length: int, batch_size: int) -> tuple[float, int]:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from flywheel import modeling
    from flywheel.config import TinyModelParams

    tokenizer = modeling.train_tokenizer((m["content"] for e in examples for m in e["messages"]), 1024)
    model = modeling.build_tiny_model(tokenizer, TinyModelParams(), seed=0)
    config = SFTConfig(
        output_dir="/tmp/flywheel-throughput",
        num_train_epochs=1,
        max_length=max_length,
        packing=packing,
        per_device_train_batch_size=batch_size,
        assistant_only_loss=True,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        logging_steps=1000,
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(examples), processing_class=tokenizer
    )
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])  # real tokens, one epoch
    return seconds, tokens


def packing_vs_padding(count: int) -> None:
    import torch

    examples = variable_length_examples(count)
    print(
        f"{count:,} examples of 8-400 words; tiny Llama on "
        f"{'a GPU' if torch.cuda.is_available() else f'the CPU ({torch.get_num_threads()} threads)'}; "
        "one epoch per run; tokens are real (non-padding) tokens"
    )
    # Pairs that see about the same number of examples per step: a packed row of 2n tokens
    # holds about as many of these examples (~107 tokens each) as a padded batch of n/64.
    pairs = [(256, 2), (512, 4), (1024, 8)]
    print(f"{'':<34}{'tokens/s':>10}{'seconds':>9}")
    for row_tokens, batch in pairs:
        packed_seconds, packed_tokens = train_once(examples, packing=True, max_length=row_tokens, batch_size=1)
        padded_seconds, padded_tokens = train_once(examples, packing=False, max_length=512, batch_size=batch)
        packed, padded = packed_tokens / packed_seconds, padded_tokens / padded_seconds
        print(f"  packing, rows of {row_tokens:>4} tokens       {packed:>10,.0f}{packed_seconds:>9.1f}")
        print(
            f"  padding, batches of {batch}               {padded:>10,.0f}{padded_seconds:>9.1f}"
            f"   -> packing {packed / padded:.2f}x"
        )
    print("goal (issue #4): >= 1.8x from packing")


H100_BF16_DENSE_FLOPS = 989e12


def mfu(steps: int = 20, sequence: int = 2048, micro_batch: int = 4) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if not torch.cuda.is_available():
        raise SystemExit("--mfu needs a CUDA GPU")
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=sequence,
        torch_dtype=torch.bfloat16,
    )
    model = LlamaForCausalLM(config).to("cuda", dtype=torch.bfloat16)
    model.gradient_checkpointing_enable() if os.environ.get("CHECKPOINTING") else None
    parameters = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batch = torch.randint(0, config.vocab_size, (micro_batch, sequence), device="cuda")
    for step in range(steps + 3):
        if step == 3:  # after warm-up
            torch.cuda.synchronize()
            started = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / steps
    tokens = micro_batch * sequence
    layers, hidden = config.num_hidden_layers, config.hidden_size
    flops = 6 * parameters * tokens + 12 * layers * hidden * sequence * tokens  # + causal attention
    achieved = flops / seconds
    print(
        f"Llama {parameters / 1e9:.2f}B, bf16, seq {sequence}, micro-batch {micro_batch}: "
        f"{tokens / seconds:,.0f} tokens/s, {achieved / 1e12:.0f} TFLOP/s, "
        f"MFU {achieved / H100_BF16_DENSE_FLOPS:.1%} of {H100_BF16_DENSE_FLOPS / 1e12:.0f} TFLOP/s "
        f"(peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1500)
    parser.add_argument("--mfu", action="store_true", help="measure MFU on a CUDA GPU instead")
    args = parser.parse_args()
    mfu() if args.mfu else packing_vs_padding(args.examples)


if __name__ == "__main__":
    main()
