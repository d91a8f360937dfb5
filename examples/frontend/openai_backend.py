"""The same kind of program over an OpenAI-compatible API (here lmprog's own /v1 routes; with
no --base-url it talks to api.openai.com and needs OPENAI_API_KEY).

    python examples/frontend/openai_backend.py --base-url http://127.0.0.1:30000/v1 \
        --model smollm2-135m-instruct
"""

import argparse

from lmprog import OpenAI, assistant, function, gen, set_default_backend, system, user


@function
def multi_turn_question(s, question_1, question_2):
    s += system("You are a helpful assistant.")
    s += user(question_1)
    s += assistant(gen("answer_1", max_tokens=64))
    s += user(question_2)
    s += assistant(gen("answer_2", max_tokens=64))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gpt-4o-mini")
    parser.add_argument("--base-url", default=None)
    args = parser.parse_args()
    set_default_backend(OpenAI(args.model, base_url=args.base_url, is_chat_model=True))
    state = multi_turn_question.run(
        question_1="What is the capital of Germany?",
        question_2="List two things to see there.",
        temperature=0,
    )
    for m in state.messages():
        print(m["role"], ":", m["content"])
