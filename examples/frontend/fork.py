"""fork: branches share the prompt's KV (computed once), generate in parallel, then join.

python examples/frontend/fork.py --url http://127.0.0.1:30000
"""

import argparse

from lmprog import RuntimeEndpoint, function, gen, set_default_backend


@function
def tip_suggestion(s, topic):
    s += f"Here are two tips for {topic}.\n"
    forks = s.fork(2)
    forks += lambda i: f"Tip {i + 1}:" + gen("tip", max_tokens=32, stop="\n")
    forks.join()  # the branches' variables come back as lists
    s += "Tip 1:" + s["tip"][0] + "\nTip 2:" + s["tip"][1] + "\n"
    s += "In summary:" + gen("summary", max_tokens=32, stop="\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    args = parser.parse_args()
    set_default_backend(RuntimeEndpoint(args.url))
    state = tip_suggestion.run(topic="staying healthy", temperature=0.7)
    print(state.text())
