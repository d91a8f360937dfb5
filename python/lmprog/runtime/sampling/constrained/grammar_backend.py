"""GrammarBackend: compiles GrammarSpecs with xgrammar, off the scheduler's thread, cached.

Compiling a JSON schema or regex against a 49k-token vocabulary takes milliseconds to seconds
(xgrammar precomputes which tokens each grammar state admits). The scheduler submits a spec when
a request arrives and keeps stepping the other requests; the request is admitted once its future
is done. xgrammar's C++ compiler releases the GIL, so compiling does not stall decoding.

Results (and failures: an invalid regex stays invalid) are cached per spec, so the same schema is
compiled once while it is in use. The cache holds at most `cache_size` grammars (least recently
used out first: a compiled grammar can take megabytes, and clients can send endless distinct
schemas); a request already holding one keeps it.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from lmprog.runtime.sampling.constrained.grammar_spec import GrammarSpec

# JSON grammars allow no free whitespace beyond the separators below: a small model given any
# whitespace can wander into endless newlines.
JSON_SEPARATORS = (", ", ": ")
ANY_JSON_OBJECT = '{"type": "object"}'


class GrammarError(ValueError):
    """A grammar that does not compile; the message names the kind and xgrammar's reason."""


def _require_xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as e:
        raise GrammarError(
            "constrained decoding (regex, json_schema, ebnf) needs the xgrammar package: "
            "pip install xgrammar"
        ) from e
    return xgrammar


class GrammarBackend:
    def __init__(
        self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int], cache_size: int = 256
    ) -> None:
        xgr = _require_xgrammar()
        self.cache_size = cache_size
        self.vocab_size = vocab_size
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids
        )
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=1)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
        self._futures: OrderedDict[GrammarSpec, Future] = OrderedDict()
        self._lock = threading.Lock()

    def submit(self, spec: GrammarSpec) -> Future:
        """A future of the compiled grammar (raising GrammarError when it does not compile)."""
        with self._lock:
            future = self._futures.get(spec)
            if future is None:
                future = self._pool.submit(self._compile, spec)
                self._futures[spec] = future
                while len(self._futures) > self.cache_size:
                    self._futures.popitem(last=False)
            else:
                self._futures.move_to_end(spec)
            return future

    @property
    def cached(self) -> int:
        """How many grammars (compiled, compiling or failed) the cache holds."""
        return len(self._futures)

    def compile(self, spec: GrammarSpec) -> Any:
        """Compiles now (blocking); raises GrammarError."""
        return self.submit(spec).result()

    def _compile(self, spec: GrammarSpec) -> Any:
        c = self._compiler
        try:
            if spec.kind == "regex":
                return c.compile_regex(spec.source)
            if spec.kind == "ebnf":
                return c.compile_grammar(spec.source)
            if spec.kind == "structural_tag":
                return c.compile_structural_tag(_strict_json_schemas(json.loads(spec.source)))
            if spec.kind == "json_object":  # any object: any keys
                return c.compile_json_schema(
                    ANY_JSON_OBJECT, any_whitespace=False, separators=JSON_SEPARATORS
                )
            json.loads(spec.source)  # a clear message for text that is not JSON at all
            # strict: no properties beyond the schema's unless it allows them (as OpenAI's
            # structured outputs), so a small model cannot wander into extra keys.
            return c.compile_json_schema(
                spec.source, any_whitespace=False, separators=JSON_SEPARATORS, strict_mode=True
            )
        except json.JSONDecodeError as e:
            raise GrammarError(f"{spec.kind} is not valid JSON: {e}") from None
        except RuntimeError as e:
            # "[time] path/file.cc:83: Regex parsing error at ..." -> the reason alone
            reason = re.sub(r"^\[[^\]]*\]\s*|\S+\.cc:\d+:\s*", "", str(e).strip())
            raise GrammarError(f"invalid {spec.kind}: {reason.splitlines()[0]}") from None

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _strict_json_schemas(tag: Any) -> str:
    """The structural tag `tag` (parsed) as JSON text, its JSON-schema parts made to compile as
    the json_schema constraint does: strict, with no whitespace beyond the separators (xgrammar's
    own json_schema part allows at least one free whitespace character between tokens)."""
    import xgrammar as xgr

    def convert(n: Any) -> Any:
        if isinstance(n, list):
            return [convert(x) for x in n]
        if not isinstance(n, dict):
            return n
        if n.get("type") == "json_schema" and n.get("style", "json") == "json":
            schema = json.dumps(n["json_schema"])
            grammar = xgr.Grammar.from_json_schema(
                schema, any_whitespace=False, separators=JSON_SEPARATORS, strict_mode=True
            )
            return {"type": "grammar", "grammar": str(grammar)}
        return {k: convert(v) for k, v in n.items()}

    return json.dumps(convert(tag))
