"""Streaming generation with AsyncLLM, vLLM's V1 streaming engine API, on the embedded model.

Each prompt's reply is printed as its tokens arrive (DELTA outputs: only the new text each
time); then the same prompts run at once, as concurrent generators that the engine batches.

python examples/async_llm_streaming.py [--model smollm2-135m-instruct] [--max-tokens 64]
"""

import argparse
import asyncio

from lmprog import AsyncEngineArgs, AsyncLLM, RequestOutput, SamplingParams
from lmprog.sampling_params import RequestOutputKind

prompts = [
    "Hello, my name is",
    "The capital of France is",
    "The future of AI is",
]


async def stream_response(engine: AsyncLLM, prompt: str, request_id: str, max_tokens: int) -> None:
    """Prints the reply to one prompt piece by piece, as the engine produces it."""
    sampling_params = SamplingParams(
        max_tokens=max_tokens,
        temperature=0.8,
        top_p=0.95,
        seed=42,
        output_kind=RequestOutputKind.DELTA,  # each output carries only what is new
    )
    print(f"\nPrompt: {prompt!r}")
    print("Response: ", end="", flush=True)
    async for output in engine.generate(
        prompt=prompt, sampling_params=sampling_params, request_id=request_id
    ):
        for completion in output.outputs:
            print(completion.text, end="", flush=True)
        if output.finished:
            print(f"\n[finished: {output.outputs[0].finish_reason}]")


async def generate_together(engine: AsyncLLM, max_tokens: int) -> None:
    """Every prompt at once: one generator each, all batched by the engine."""
    sampling_params = SamplingParams(
        max_tokens=max_tokens, temperature=0, output_kind=RequestOutputKind.FINAL_ONLY
    )

    async def final_output(prompt: str, request_id: str) -> RequestOutput:
        async for output in engine.generate(prompt, sampling_params, request_id):
            last = output
        return last

    outputs = await asyncio.gather(
        *(final_output(prompt, f"together-{i}") for i, prompt in enumerate(prompts))
    )
    print()
    for output in outputs:
        print(f"Prompt: {output.prompt!r}, Generated text: {output.outputs[0].text!r}")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=args.model))
    try:
        for i, prompt in enumerate(prompts):
            await stream_response(engine, prompt, f"stream-{i}", args.max_tokens)
        await generate_together(engine, args.max_tokens)
    finally:
        engine.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
