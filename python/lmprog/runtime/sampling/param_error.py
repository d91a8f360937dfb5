"""ParamError: a bad request field, named so that an API can say which one.

It is a ValueError (what the offline API raises for bad input, as vLLM does); the server maps it
to a 400 whose `error.param` is `param`. Torch-free, like sampling_params.py.
"""

from __future__ import annotations


class ParamError(ValueError):
    """A field's value is out of its range or of the wrong type; `param` is the field's name
    (in the offline API's terms: vLLM's SamplingParams names, `prompt` for the prompt)."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param
