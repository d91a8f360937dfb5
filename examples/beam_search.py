"""Beam search with vLLM's API (`LLM.beam_search`), on the embedded default model.

python examples/beam_search.py [--model smollm2-135m-instruct] [--beam-width 4]

The server does the same on `/generate` with the seeds' body:
    curl localhost:30000/generate -d '{"prompt": "San Francisco is a", "use_beam_search": true,
                                       "n": 4, "temperature": 0}'
"""

import argparse

from lmprog import LLM, BeamSearchParams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--beam-width", type=int, default=4)
    args = parser.parse_args()

    llm = LLM(model=args.model)
    params = BeamSearchParams(beam_width=args.beam_width, max_tokens=16)
    for output in llm.beam_search([{"prompt": "San Francisco is a"}], params):
        for rank, beam in enumerate(output.sequences, start=1):
            print(f"{rank}. {beam.cum_logprob:8.3f}  {beam.text!r}")


if __name__ == "__main__":
    main()
