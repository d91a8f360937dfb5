"""Classification, as in vLLM's basic examples: one probability per label for each prompt.

python examples/classify.py [--model jason9693/Qwen2.5-1.5B-apeach]

Any `*ForSequenceClassification` checkpoint of the Llama family (Llama, Mistral, Qwen2, Qwen3)
or of BERT works: a hub id (downloaded once) or a local HF folder. The architecture makes it a
classifier; `runner="pooling"` says so explicitly.
"""

import argparse

from lmprog import LLM

prompts = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="jason9693/Qwen2.5-1.5B-apeach")
    args = parser.parse_args()

    llm = LLM(model=args.model, runner="pooling")
    labels = llm.pooling_task.labels  # the config's id2label
    for prompt, output in zip(prompts, llm.classify(prompts)):
        probs = output.outputs.probs
        best = max(range(len(probs)), key=probs.__getitem__)
        print(f"Prompt: {prompt!r} | label {labels[best]!r} | probabilities {probs}")


if __name__ == "__main__":
    main()
