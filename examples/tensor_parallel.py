"""Offline inference with the model split over several processes (tensor parallelism).

python examples/tensor_parallel.py [--model smollm2-135m-instruct] [--tp 3]

SmolLM2-135M has 9 query heads and 3 KV heads, so it splits over 3 ranks (not 2). Each rank is
a process of its own (spawned: hence the `__main__` guard below, as with vLLM), reading only its
slice of the weights; the answers are those of one process, greedy, token for token in float32.
"""

import argparse

from lmprog import LLM, SamplingParams

prompts = ["The capital of France is", "Three facts about the moon:"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tp", type=int, default=3)
    args = parser.parse_args()

    params = SamplingParams(temperature=0, max_tokens=24)
    llm = LLM(model=args.model, tensor_parallel_size=args.tp, dtype="float32")
    for output in llm.generate(prompts, params):
        print(f"{output.prompt!r} -> {output.outputs[0].text!r}")
    llm.shutdown()


if __name__ == "__main__":
    main()
