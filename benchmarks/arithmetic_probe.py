"""What an arithmetic policy answers: exact values, or the teacher's rounded estimates.

    python benchmarks/arithmetic_probe.py assets/quickstart_policy
    python benchmarks/arithmetic_probe.py runs/quickstart/csv/version_N/hf_export --samples 8

Loads a policy directory with transformers, asks every held-out problem (data/arithmetic/
val.jsonl, through the same prompt formatting as the trainer) greedily and `--samples` times at
temperature 1, and reads the number in `\\boxed{}`. Reports the share of greedy answers that are
exact, the share that are the value rounded to the nearest ten (the SFT teacher's habit) where
that differs from the exact value, the exact share of the samples, and pass@k. Last line: one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import re

import torch

from rpp_lightning.tasks.arithmetic import round_to_ten
from rpp_lightning.trainer.data import PromptDataModule

BOXED = re.compile(r"\\boxed\{(-?\d+)\}")


def boxed_numbers(model, tokenizer, prompts: list[list[int]], **sampling) -> list[int | None]:
    """The `\\boxed{}` number of one response per prompt (None where there is none)."""
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id or 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=12, pad_token_id=pad, **sampling
        )
    numbers = []
    for row in out[:, width:]:
        match = BOXED.search(tokenizer.decode(row, skip_special_tokens=True))
        numbers.append(int(match.group(1)) if match else None)
    return numbers


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("policy", help="a policy directory (from_pretrained)")
    parser.add_argument("--val", default="data/arithmetic/val.jsonl")
    parser.add_argument("--samples", type=int, default=8, help="k of pass@k")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = PromptDataModule(tokenizer=args.policy, train_path=args.val, val_path=args.val)
    data.setup("fit")
    rows = data.val_rows
    tokenizer = AutoTokenizer.from_pretrained(args.policy)
    model = AutoModelForCausalLM.from_pretrained(args.policy).eval()
    prompts = [row.prompt_ids for row in rows]
    exact = [int(row.reference) for row in rows]
    torch.manual_seed(args.seed)
    greedy = boxed_numbers(model, tokenizer, prompts, do_sample=False)
    sampled = [
        boxed_numbers(model, tokenizer, prompts, do_sample=True, temperature=1.0, top_k=0)
        for _ in range(args.samples)
    ]
    n = len(rows)
    result = {
        "greedy_exact": sum(g == e for g, e in zip(greedy, exact, strict=True)) / n,
        "greedy_rounded": sum(g == round_to_ten(e) != e for g, e in zip(greedy, exact, strict=True))
        / n,
        "sampled_exact": sum(s[i] == exact[i] for s in sampled for i in range(n))
        / (n * args.samples),
        f"pass@{args.samples}": sum(any(s[i] == exact[i] for s in sampled) for i in range(n)) / n,
        "problems": n,
        "policy": args.policy,
    }
    print(
        f"{args.policy}: greedy exact {result['greedy_exact']:.1%}, greedy rounded instead "
        f"{result['greedy_rounded']:.1%}; sampled exact {result['sampled_exact']:.1%}, "
        f"pass@{args.samples} {result[f'pass@{args.samples}']:.1%} ({n} problems)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
