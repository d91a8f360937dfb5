"""Tool calls through the OpenAI client: the model calls a function, the program runs it and
sends back the result, and the model answers with it.

    python -m lmprog.launch_server --tool-call-parser hermes &
    python examples/tool_calls.py [--base-url http://127.0.0.1:30000/v1]

tool_choice "required" (or a named function) makes even a small model write a valid call: a
grammar enforces the call format and the function's parameters. With "auto" the model decides,
and the server reads whatever calls it wrote.
"""

import argparse
import json

from openai import OpenAI

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "The city, e.g. Paris"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    }
]


def get_weather(city: str, unit: str = "celsius") -> dict:
    return {"city": city, "temperature": 22 if unit == "celsius" else 72, "sky": "sunny"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", default="http://127.0.0.1:30000/v1")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="EMPTY")
    messages = [{"role": "user", "content": "What is the weather like in Paris today?"}]

    # 1. The model must call a tool: the reply is a tool call, not text.
    reply = client.chat.completions.create(
        model=args.model,
        messages=messages,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=48,
        temperature=0,
    )
    message = reply.choices[0].message
    print(f"finish_reason: {reply.choices[0].finish_reason}")
    messages.append(message.model_dump(include={"role", "content", "tool_calls"}))

    # 2. Run each call and send its result back, as a tool message answering the call's id.
    for call in message.tool_calls:
        arguments = json.loads(call.function.arguments)
        result = get_weather(**arguments)
        print(f"{call.function.name}({arguments}) -> {result}")
        messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})

    # 3. The answer, streamed; tool_choice "auto" lets the model call again if it wants to.
    stream = client.chat.completions.create(
        model=args.model, messages=messages, tools=TOOLS, max_tokens=32, temperature=0, stream=True
    )
    print("Answer: ", end="")
    for chunk in stream:
        delta = chunk.choices[0].delta
        for piece in delta.tool_calls or []:
            print(piece.function.name or "", piece.function.arguments or "", end="")
        print(delta.content or "", end="", flush=True)
    print()


if __name__ == "__main__":
    main()
