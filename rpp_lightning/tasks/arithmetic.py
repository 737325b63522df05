"""Arithmetic problems with ground-truth answers, deterministic by seed, written as JSONL.

Difficulty levels (the `level` column, which reward sources can route on):
  1  a + b, a - b with one-digit operands
  2  two-digit addition and subtraction
  3  a × b with one-digit operands, or a + b + c
  4  (a + b) × c, a × b - c with small operands

    python -m rpp_lightning.tasks.arithmetic --out data/arithmetic --train 4000 --val 200

Rows: {"prompt": "What is 7 + 5?", "answer": "12", "level": 1}. The answer is the
reference for the math verifier; responses are expected to end in \\boxed{answer}.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

LEVELS = (1, 2, 3, 4)


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


def write_splits(
    out: str | Path, train: int, val: int, seed: int = 0, levels: tuple[int, ...] = LEVELS
) -> tuple[Path, Path]:
    """Write train.jsonl and val.jsonl (held-out prompts never appear in train)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    val_rows = make_rows(val, seed + 1, levels)
    held_out = {row["prompt"] for row in val_rows}
    train_rows, attempt = [], 0
    while len(train_rows) < train:
        for row in make_rows(train, seed + 1000 + attempt, levels):
            if row["prompt"] not in held_out and len(train_rows) < train:
                train_rows.append(row)
        attempt += 1
    paths = out / "train.jsonl", out / "val.jsonl"
    for path, rows in zip(paths, (train_rows, val_rows), strict=True):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/arithmetic")
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--levels", type=int, nargs="+", default=list(LEVELS))
    args = parser.parse_args()
    for path in write_splits(args.out, args.train, args.val, args.seed, tuple(args.levels)):
        print(path)


if __name__ == "__main__":
    main()
