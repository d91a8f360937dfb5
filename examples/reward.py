"""Reward models, as in vLLM's basic examples: a scalar reward per conversation (a sequence
classifier with one label), or a score per token (a `*ForTokenClassification`).

python examples/reward.py [--model Skywork/Skywork-Reward-V2-Qwen3-0.6B]

Reward models judge a whole exchange, so each conversation goes through the model's chat
template before it is scored.
"""

import argparse

from lmprog import LLM

conversations = [
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ],
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "I like turtles."},
    ],
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="Skywork/Skywork-Reward-V2-Qwen3-0.6B")
    args = parser.parse_args()

    llm = LLM(model=args.model, runner="pooling")
    tokenizer = llm.get_tokenizer()
    # Token ids, so that the tokenizer adds no second BOS to the template's own.
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    prompts = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    for conversation, output in zip(conversations, llm.reward(prompts)):
        data = output.outputs.data  # [1] for a reward model; [tokens, labels] per token
        reward = data[0].item() if data.dim() == 1 else data.tolist()
        print(f"Answer: {conversation[-1]['content']!r} | reward {reward}")


if __name__ == "__main__":
    main()
