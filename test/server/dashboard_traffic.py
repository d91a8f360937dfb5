"""Few-shot traffic for the dashboard tests: questions that share one long prefix."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import requests

MODEL = "smollm2-135m-instruct"
FEW_SHOT = (
    "Answer each question about geography with one word.\n"
    "Q: What is the capital of France? A: Paris\n"
    "Q: What is the capital of Italy? A: Rome\n"
    "Q: What is the capital of Spain? A: Madrid\n"
    "Q: What is the capital of Germany? A: Berlin\n"
)
QUESTIONS = ["Japan", "Egypt", "Canada", "Peru", "Kenya", "Norway"]
# A second family, for traffic with more than one shared prefix (the README's screenshot).
ARITHMETIC = (
    "Compute each sum and answer with the number only.\n"
    "Q: 12 + 30 = ? A: 42\nQ: 7 + 8 = ? A: 15\nQ: 100 + 23 = ? A: 123\n"
)


def few_shot_batch(
    url: str, headers: dict | None = None, tag: str = "dash", arithmetic: bool = False
) -> list[dict]:
    """One few-shot batch, the questions sent together: the prefix is cached by the first
    and reused by the rest. `arithmetic` asks sums behind the ARITHMETIC prefix instead."""

    def ask(i: int) -> dict:
        question = f"{FEW_SHOT}Q: What is the capital of {QUESTIONS[i]}? A:"
        if arithmetic:
            question = f"{ARITHMETIC}Q: {11 * i + 5} + {7 * i + 3} = ? A:"
        body = {
            "text": question,
            "sampling_params": {"max_new_tokens": 4, "temperature": 0},
            "rid": f"{tag}-{i}",
        }
        r = requests.post(f"{url}/generate", json=body, headers=headers or {}, timeout=120)
        r.raise_for_status()
        return r.json()

    first = ask(0)  # caches the prefix
    with ThreadPoolExecutor(len(QUESTIONS) - 1) as pool:
        return [first, *pool.map(ask, range(1, len(QUESTIONS)))]
