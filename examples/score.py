"""Cross-encoder scoring, as in vLLM's basic examples: how relevant each text is to a query.

python examples/score.py [--model cross-encoder/ms-marco-MiniLM-L-6-v2]

A cross-encoder (a `*ForSequenceClassification` with one label, e.g. BERT's) reads the query
and a text as one input and scores the pair by the sigmoid of its logit. With an embedding
model instead (e.g. all-minilm-l6-v2), `score` is the cosine of the two embeddings.
"""

import argparse

from lmprog import LLM

query = "What is the capital of France?"
texts = [
    "The capital of France is Paris.",
    "Bananas are rich in potassium.",
    "Paris hosts the Louvre, the world's most visited museum.",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="cross-encoder/ms-marco-MiniLM-L-6-v2")
    args = parser.parse_args()

    llm = LLM(model=args.model, runner="pooling")
    outputs = llm.score(query, texts)
    for text, output in sorted(zip(texts, outputs), key=lambda p: -p[1].outputs.score):
        print(f"Score: {output.outputs.score:.4f} | {text!r}")


if __name__ == "__main__":
    main()
