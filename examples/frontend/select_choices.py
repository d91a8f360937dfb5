"""select: the model picks one of several answers by likelihood (one batched scoring call).

python examples/frontend/select_choices.py --url http://127.0.0.1:30000
"""

import argparse

from lmprog import RuntimeEndpoint, assistant, function, select, set_default_backend, user


@function
def judge(s, statement):
    s += user(f"Is this statement true or false? {statement}")
    s += assistant("The statement is " + select("verdict", ["true", "false"]))


@function
def capital(s, country):
    s += f"The capital of {country} is" + select("city", [" Berlin", " Paris", " Rome"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    args = parser.parse_args()
    set_default_backend(RuntimeEndpoint(args.url))
    print("Germany ->", capital.run(country="Germany")["city"])
    state = judge.run(statement="Fish live in water.")
    print(
        "verdict:", state["verdict"], state.get_meta_info("verdict")["normalized_prompt_logprobs"]
    )
