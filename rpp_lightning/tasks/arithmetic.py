"""Arithmetic problems with ground-truth answers, deterministic by seed, written as JSONL.

Difficulty levels (the `level` column, which reward sources can route on):
  1  a + b, a - b with one-digit operands
  2  two-digit addition and subtraction
  3  a × b with one-digit operands, or a + b + c
  4  (a + b) × c, a × b - c with small operands

    python -m rpp_lightning.tasks.arithmetic --out data/arithmetic --train 20000 --val 200

Rows: {"prompt": "Calculate 17 + 5.", "answer": "22", "level": 1}, each problem asked in one of
four wordings. The answer is the reference for the math verifier; responses are expected to end
in \\boxed{answer}.

Three splits, as in a real SFT → RL pipeline:
  sft.jsonl    the SFT data: every training problem answered by an imperfect teacher that
               gives an estimate (the value rounded to the nearest ten) instead of the exact
               value in 60 % of its answers: "answer" is the teacher's (22 → 20), and
               "exact_answer" the value. A student trained to imitate the teacher learns the
               arithmetic and the habit; an exact-match verifier rewards only the arithmetic,
               which is what the quickstart's RL stage shows.
  train.jsonl  the same problems without the teacher's answers: the RL prompts
  val.jsonl    held-out problems (never in the other two)
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

LEVELS = (1, 2, 3, 4)
WORDINGS = ("What is {}?", "Calculate {}.", "{} = ?", "Compute: {}")
"""How problems are asked (each row draws one)."""
TEACHER_ROUNDING_RATE = 0.6
"""Share of the SFT teacher's answers that are estimates (rounded to the nearest ten)."""


def round_to_ten(value: int) -> int:
    """The nearest multiple of ten, halves up: 15 → 20, -15 → -10, 4 → 0."""
    return 10 * math.floor(value / 10 + 0.5)


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
    """`count` rows, levels drawn uniformly from `levels` and wordings from WORDINGS,
    deterministic in `seed`."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        level = rng.choice(levels)
        expression, value = make_problem(rng, level)
        prompt = rng.choice(WORDINGS).format(expression)
        rows.append({"prompt": prompt, "answer": str(value), "level": level})
    return rows


def expression_of(prompt: str) -> str:
    """The arithmetic expression a prompt asks about."""
    for wording in WORDINGS:
        head, tail = wording.split("{}")
        if prompt.startswith(head) and prompt.endswith(tail):
            return prompt[len(head) : len(prompt) - len(tail)]
    raise ValueError(f"not a task prompt: {prompt!r}")


def with_teacher_answers(
    rows: list[dict], seed: int, rounding_rate: float = TEACHER_ROUNDING_RATE
) -> list[dict]:
    """The SFT data: the teacher's answer in "answer" (rounded to ten at `rounding_rate`), the
    value in "exact_answer"."""
    rng = random.Random(seed)
    out = []
    for row in rows:
        value = int(row["answer"])
        teacher = round_to_ten(value) if rng.random() < rounding_rate else value
        out.append({**row, "answer": str(teacher), "exact_answer": row["answer"]})
    return out


def write_splits(
    out: str | Path,
    train: int,
    val: int,
    seed: int = 0,
    levels: tuple[int, ...] = LEVELS,
    rounding_rate: float = TEACHER_ROUNDING_RATE,
) -> tuple[Path, Path, Path]:
    """Write sft.jsonl, train.jsonl and val.jsonl; held-out problems never appear in the others.

    sft.jsonl and train.jsonl hold the same problems, sft.jsonl with the teacher's answers.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    val_rows = make_rows(val, seed + 1, levels)
    held_out = {expression_of(row["prompt"]) for row in val_rows}
    train_rows, attempt = [], 0
    while len(train_rows) < train:
        for row in make_rows(train, seed + 1000 + attempt, levels):
            if expression_of(row["prompt"]) not in held_out and len(train_rows) < train:
                train_rows.append(row)
        attempt += 1
    splits = {
        "sft.jsonl": with_teacher_answers(train_rows, seed + 2, rounding_rate),
        "train.jsonl": train_rows,
        "val.jsonl": val_rows,
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
    parser.add_argument(
        "--teacher-rounding-rate",
        type=float,
        default=TEACHER_ROUNDING_RATE,
        help="share of the SFT teacher's answers rounded to the nearest ten",
    )
    args = parser.parse_args()
    paths = write_splits(
        args.out, args.train, args.val, args.seed, tuple(args.levels), args.teacher_rounding_rate
    )
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
