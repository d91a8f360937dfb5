"""What the executor needs from a backend.

Every backend:
- get_chat_template() -> ChatTemplate: how roles become text;
- generate(executor, params) -> (text, meta_info): one gen, continuing `executor.text_`
  (chat backends read `executor.messages_`);
- select(executor, choices, temperature, method) -> ChoicesDecision;
- flush_cache() -> bool and get_server_info() -> dict, where the backend has them.

Optional: generate_stream(executor, params) yielding (text piece, meta_info); cache_prefix(text)
(prefill a prefix so later requests find it cached: run_batch's traced prefix);
fork_prefill(executor) (prefill the shared prefix before forking); role_end(executor, role).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

from lmprog.lang.chat_template import ChatTemplate
from lmprog.lang.choices import ChoicesDecision, ChoicesSamplingMethod
from lmprog.lang.ir import GenParams


class BaseBackend(ABC):
    @abstractmethod
    def get_chat_template(self) -> ChatTemplate: ...

    @abstractmethod
    def generate(self, executor: Any, params: GenParams) -> tuple[str, dict]: ...

    def generate_stream(self, executor: Any, params: GenParams) -> Iterator[tuple[str, dict]]:
        yield self.generate(executor, params)

    @abstractmethod
    def select(
        self,
        executor: Any,
        choices: list[str],
        temperature: float,
        method: ChoicesSamplingMethod,
    ) -> ChoicesDecision: ...

    def flush_cache(self) -> bool:
        raise NotImplementedError(f"{type(self).__name__} has no cache to flush")

    def get_server_info(self) -> dict:
        raise NotImplementedError(f"{type(self).__name__} has no server info")

    def shutdown(self) -> None:
        pass
