"""Write the example dataset task's prompts: sums of three one-digit numbers, with the answer in a column.

    python recipes/tasks/sums/make_data.py        # rewrites sums.jsonl and sums_chat.jsonl beside this file

Both files hold the same 300 problems (seeded, so the files are the same on every machine):

- ``sums.jsonl``: standard prompts, ``{"prompt": "3+4+5=", "answer": "12", "terms": 3}``, for the built-in
  character model (it was warmed up on two-digit addition, never on three terms or one-digit numbers);
- ``sums_chat.jsonl``: conversational prompts, ``{"prompt": [{"role": "user", "content": "What is 3+4+5? ..."}],
  ...}``, for instruct models, rendered through the model's chat template.

``answer`` and ``terms`` reach the reward and metric functions (scoring.py) as keyword arguments.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROWS = 300
SEED = 20261130
HERE = Path(__file__).resolve().parent
QUESTION = "What is {expr}? Answer with the number only."


def problems(n: int = ROWS, seed: int = SEED) -> list[tuple[str, str]]:
    """``n`` distinct (expression, answer) pairs, each a sum of three one-digit numbers."""
    rng = random.Random(seed)
    all_terms = [(a, b, c) for a in range(10) for b in range(10) for c in range(10)]
    chosen = rng.sample(all_terms, n)
    return [("+".join(map(str, t)), str(sum(t))) for t in chosen]


def main() -> None:
    pairs = problems()
    with (HERE / "sums.jsonl").open("w", encoding="utf-8") as f:
        for expr, answer in pairs:
            f.write(json.dumps({"prompt": f"{expr}=", "answer": answer, "terms": 3}) + "\n")
    with (HERE / "sums_chat.jsonl").open("w", encoding="utf-8") as f:
        for expr, answer in pairs:
            messages = [{"role": "user", "content": QUESTION.format(expr=expr)}]
            f.write(json.dumps({"prompt": messages, "answer": answer, "terms": 3}) + "\n")
    print(f"wrote {len(pairs)} problems to {HERE / 'sums.jsonl'} and {HERE / 'sums_chat.jsonl'}")


if __name__ == "__main__":
    main()
