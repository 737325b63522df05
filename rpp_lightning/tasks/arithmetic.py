"""Arithmetic problems with ground-truth answers, deterministic by seed, written as JSONL.

Difficulty levels (the `level` column, which reward sources can route on):
  1  a + b, a - b with one-digit operands
  2  two-digit addition and subtraction
  3  a × b with one-digit operands, or a + b + c
  4  (a + b) × c, a × b - c with small operands

    python -m rpp_lightning.tasks.arithmetic --out data/arithmetic --train 20000 --val 200

Rows: {"prompt": "What is 7 + 5?", "answer": "12", "level": 1}. The answer is the
reference for the math verifier; responses are expected to end in \\boxed{answer}.

Three splits, as in a real SFT → RL pipeline where RL prompts are not phrased like SFT data:
  sft.jsonl    every problem asked one way, "What is 7 + 5?" (the quickstart policy's SFT data)
  train.jsonl  the same problems asked in four wordings ("Calculate 7 + 5.", "7 + 5 = ?", ...)
  val.jsonl    held-out problems (never in the other two), in the four wordings
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

LEVELS = (1, 2, 3, 4)
WORDINGS = ("What is {}?", "Calculate {}.", "{} = ?", "Compute: {}")
"""How train and held-out problems are asked; the SFT split uses only the first."""


def make_problem(rng: random.Random, level: int) -> tuple[str, int]:
    """One (expression, value) pair of the given difficulty."""
    if level == 1:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        op = rng.choice("+-")
    elif level == 2:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        op = rng.choice("+-")
    elif level == 3:
        if rng.random() < 0.5:
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            return f"{a} * {b}", a * b
        a, b, c = rng.randint(1, 20), rng.randint(1, 20), rng.randint(1, 20)
        return f"{a} + {b} + {c}", a + b + c
    elif level == 4:
        a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(2, 9)
        if rng.random() < 0.5:
            return f"({a} + {b}) * {c}", (a + b) * c
        return f"{a} * {c} - {b}", a * c - b
    else:
        raise ValueError(f"level must be one of {LEVELS}, got {level}")
    return f"{a} {op} {b}", a + b if op == "+" else a - b


def make_rows(count: int, seed: int, levels: tuple[int, ...] = LEVELS) -> list[dict]:
    """`count` rows, levels drawn uniformly from `levels`, deterministic in `seed`."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        level = rng.choice(levels)
        expression, value = make_problem(rng, level)
        rows.append({"prompt": f"What is {expression}?", "answer": str(value), "level": level})
    return rows


def reword(rows: list[dict], seed: int, wordings: tuple[str, ...] = WORDINGS) -> list[dict]:
    """The same problems, each asked in a wording drawn uniformly from `wordings`."""
    rng = random.Random(seed)
    out = []
    for row in rows:
        expression = row["prompt"].removeprefix("What is ").removesuffix("?")
        out.append({**row, "prompt": rng.choice(wordings).format(expression)})
    return out


def write_splits(
    out: str | Path, train: int, val: int, seed: int = 0, levels: tuple[int, ...] = LEVELS
) -> tuple[Path, Path, Path]:
    """Write sft.jsonl, train.jsonl and val.jsonl; held-out problems never appear in the others.

    sft.jsonl asks every problem as "What is ...?"; train.jsonl asks the same problems and
    val.jsonl the held-out ones in all of WORDINGS (so RL adapts the SFT policy to new wordings).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    val_rows = make_rows(val, seed + 1, levels)
    held_out = {row["prompt"] for row in val_rows}
    sft_rows, attempt = [], 0
    while len(sft_rows) < train:
        for row in make_rows(train, seed + 1000 + attempt, levels):
            if row["prompt"] not in held_out and len(sft_rows) < train:
                sft_rows.append(row)
        attempt += 1
    splits = {
        "sft.jsonl": sft_rows,
        "train.jsonl": reword(sft_rows, seed + 2),
        "val.jsonl": reword(val_rows, seed + 3),
    }
    for name, rows in splits.items():
        (out / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return tuple(out / name for name in splits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/arithmetic")
    # 20000 training rows: the quickstart's short SFT sees each about 1.6 times, so it learns the
    # task rather than memorising prompts, and REINFORCE++ gains carry over to held-out prompts
    parser.add_argument("--train", type=int, default=20000)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--levels", type=int, nargs="+", default=list(LEVELS))
    args = parser.parse_args()
    for path in write_splits(args.out, args.train, args.val, args.seed, tuple(args.levels)):
        print(path)


if __name__ == "__main__":
    main()
