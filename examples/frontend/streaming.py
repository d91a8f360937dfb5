"""Streaming: print an answer as it is generated (state.text_iter), then the whole text.

python examples/frontend/streaming.py --url http://127.0.0.1:30000
"""

import argparse

from lmprog import RuntimeEndpoint, assistant, function, gen, set_default_backend, user


@function
def story(s, topic):
    s += user(f"Write two sentences about {topic}.")
    s += assistant(gen("story", max_tokens=48))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    args = parser.parse_args()
    set_default_backend(RuntimeEndpoint(args.url))
    state = story.run(topic="a lighthouse", stream=True, temperature=0)
    print("A story about a lighthouse:")
    for piece in state.text_iter("story"):
        print(piece, end="", flush=True)
    print()
