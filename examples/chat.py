"""Chat through the model's chat template, as in the FastDeploy / vLLM chat examples.

python examples/chat.py [--model smollm2-135m-instruct]
"""

import argparse

from lmprog import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()

    msg1 = [
        {"role": "system", "content": "You are a helpful AI assistant."},
        {"role": "user", "content": "What is the capital of Germany?"},
    ]
    msg2 = [
        {"role": "system", "content": "You are a helpful AI assistant."},
        {"role": "user", "content": "Write me a short poem about large language models."},
    ]
    sampling_params = SamplingParams(temperature=0, max_tokens=64)
    llm = LLM(model=args.model)
    for output in llm.chat([msg1, msg2], sampling_params):
        print(f"Prompt: {output.prompt!r}\nReply: {output.outputs[0].text!r}\n")


if __name__ == "__main__":
    main()
