"""Offline batched inference, as in the vLLM / CacheFlow quickstart, on the embedded default model.

python examples/offline_inference.py [--model smollm2-135m-instruct]
"""

import argparse

from lmprog import LLM, SamplingParams

prompts = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()

    sampling_params = SamplingParams(temperature=0.8, top_p=0.95, seed=0)
    llm = LLM(model=args.model)
    outputs = llm.generate(prompts, sampling_params)
    for output in outputs:
        prompt = output.prompt
        generated_text = output.outputs[0].text
        print(f"Prompt: {prompt!r}, Generated text: {generated_text!r}")


if __name__ == "__main__":
    main()
