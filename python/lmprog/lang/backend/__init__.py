"""Backends a program runs against: the lmprog server (RuntimeEndpoint, or Runtime, which
starts one), and OpenAI-compatible APIs (OpenAI). Each is imported on first use."""

from __future__ import annotations

from typing import Any


def RuntimeEndpoint(*args: Any, **kwargs: Any) -> Any:
    from lmprog.lang.backend.runtime_endpoint import RuntimeEndpoint as cls

    return cls(*args, **kwargs)


def Runtime(*args: Any, **kwargs: Any) -> Any:
    from lmprog.lang.backend.runtime import Runtime as cls

    return cls(*args, **kwargs)


def OpenAI(*args: Any, **kwargs: Any) -> Any:
    from lmprog.lang.backend.openai import OpenAI as cls

    return cls(*args, **kwargs)
