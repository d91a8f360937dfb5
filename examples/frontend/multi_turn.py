"""Multi-turn chat: two questions, two answers, every turn in state.messages().

python -m lmprog.launch_server &          # or pass --url of a running server
python examples/frontend/multi_turn.py
"""

import argparse

from lmprog import RuntimeEndpoint, assistant, function, gen, set_default_backend, system, user


@function
def multi_turn_question(s, question_1, question_2):
    s += system("You are a helpful assistant.")
    s += user(question_1)
    s += assistant(gen("answer_1", max_tokens=64))
    s += user(question_2)
    s += assistant(gen("answer_2", max_tokens=64))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    args = parser.parse_args()
    set_default_backend(RuntimeEndpoint(args.url))
    state = multi_turn_question.run(
        question_1="What is the capital of Germany?",
        question_2="List two things to see there.",
        temperature=0,
    )
    for m in state.messages():
        print(m["role"], ":", m["content"])
    print("answer_1 =", state["answer_1"])
