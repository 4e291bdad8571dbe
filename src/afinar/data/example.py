"""The one internal example type every input format is converted into."""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES; OpenAI's "developer" is stored as "system"
    content: str
    # Whether the model is trained on this message. Only assistant messages can be trained.
    train: bool = False


@dataclass(frozen=True)
class Example:
    """One training example: a conversation, or a raw text (then `messages` is empty)."""

    messages: tuple[Message, ...] = ()
    text: str | None = None
    path: str = ""
    line: int = 0
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def is_chat(self) -> bool:
        return self.text is None

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def system_prompt(self) -> str | None:
        """The first system message's text (None without one)."""
        return next((m.content for m in self.messages if m.role == "system"), None)

    def prompt_messages(self) -> tuple[Message, ...]:
        """Everything before the last assistant message: what a user would send at inference."""
        for i in range(len(self.messages) - 1, -1, -1):
            if self.messages[i].role == "assistant":
                return self.messages[:i]
        return self.messages

    def final_answer(self) -> str | None:
        for m in reversed(self.messages):
            if m.role == "assistant":
                return m.content
        return None
