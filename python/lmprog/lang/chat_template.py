"""Chat templates for programs: the text each role's turn is wrapped in.

A program writes `s += user("hi")`; over a completion-style backend (the lmprog server's
/generate) that becomes `prefix("user") + "hi" + suffix("user")`. The prefixes and suffixes come
from the served model's own chat template (its Jinja template, rendered on probe messages by
`derive_roles`), so a program's prompt is exactly what the model's chat format expects.

Derivation: render system/user/assistant messages with marker contents; the text around the
markers is, in order, P_sys M X_sys P_user M X_user P_asst M X_asst. Templates of the ChatML and
Llama-3 kind end every turn with the same suffix X, which the last gap gives; the gaps in between
are then X + the next prefix. A template that does not fit this shape gets None (the caller
falls back to the plain template).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")
_MARK = "\u2063LMPROG{}\u2063"  # an invisible separator: cannot occur in a template


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    roles: dict[str, tuple[str, str]]  # role -> (prefix, suffix)
    default_system_prompt: str | None = None  # inserted before a first non-system turn
    stop: list[str] = field(default_factory=list)  # end-of-turn strings (the suffixes' text)

    def prefix(self, role: str) -> str:
        return self._pair(role)[0]

    def suffix(self, role: str) -> str:
        return self._pair(role)[1]

    def _pair(self, role: str) -> tuple[str, str]:
        if role not in self.roles:
            raise ValueError(f"role must be one of {sorted(self.roles)}, got {role!r}")
        return self.roles[role]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "roles": {r: list(p) for r, p in self.roles.items()},
            "default_system_prompt": self.default_system_prompt,
            "stop": self.stop,
        }

    @classmethod
    def from_dict(cls, data: dict) -> ChatTemplate:
        roles = {r: (p[0], p[1]) for r, p in data["roles"].items()}
        return cls(
            data["name"], roles, data.get("default_system_prompt"), list(data.get("stop", []))
        )


PLAIN = ChatTemplate(
    "plain",
    {"system": ("", "\n\n"), "user": ("User: ", "\n"), "assistant": ("Assistant: ", "\n")},
)
CHATML = ChatTemplate(
    "chatml",
    {r: (f"<|im_start|>{r}\n", "<|im_end|>\n") for r in ROLES},
    stop=["<|im_end|>"],
)


def derive_roles(
    render: Callable[[list[dict], bool], str], name: str = "model"
) -> ChatTemplate | None:
    """The role prefixes/suffixes of a chat template, from `render(messages,
    add_generation_prompt) -> text`; None when the template does not have that shape."""
    marks = [_MARK.format(i) for i in range(3)]
    try:
        full = render([{"role": r, "content": m} for r, m in zip(ROLES, marks)], False)
        first_user = render([{"role": "user", "content": marks[1]}], False)
    except Exception:  # noqa: BLE001 -- a template that rejects the probe: no derivation
        return None
    parts = _split(full, marks)
    if parts is None:
        return None
    p_sys, g_sys_user, g_user_asst, x_asst = parts
    suffix = x_asst
    if not suffix or not g_sys_user.startswith(suffix) or not g_user_asst.startswith(suffix):
        return None
    roles = {
        "system": (p_sys, suffix),
        "user": (g_sys_user[len(suffix) :], suffix),
        "assistant": (g_user_asst[len(suffix) :], suffix),
    }
    stop = [suffix.strip()] if suffix.strip() else []
    return ChatTemplate(name, roles, _default_system(first_user, roles, marks[1]), stop)


def _split(text: str, marks: list[str]) -> list[str] | None:
    """The text before, between and after the markers (each must occur once, in order)."""
    parts, rest = [], text
    for mark in marks:
        if rest.count(mark) != 1:
            return None
        before, rest = rest.split(mark)
        parts.append(before)
    return [*parts, rest]


def _default_system(first_user: str, roles: dict, mark: str) -> str | None:
    """The system prompt a template inserts when a conversation has none (SmolLM2 does)."""
    head = first_user.split(mark)[0]
    p_sys, x_sys = roles["system"]
    p_user = roles["user"][0]
    if not head.endswith(p_user):
        return None
    head = head[: len(head) - len(p_user)]
    if not head.startswith(p_sys) or not head.endswith(x_sys) or len(head) <= len(p_sys + x_sys):
        return None
    return head[len(p_sys) : len(head) - len(x_sys)]
