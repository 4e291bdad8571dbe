"""The one internal example type every input format is converted into.

A preference pair (chosen vs rejected answer) is an Example too: `messages` is the prompt and the
chosen answer, `rejected` the other answer to the same prompt. Everything that reads prompts and
reference answers (splits, held-out answers, checks) therefore works on pairs unchanged, and SFT
on a preference file trains on its chosen answers.
"""

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
    rejected: str | None = None  # a preference pair's non-preferred final answer

    @property
    def is_preference(self) -> bool:
        return self.rejected is not None

    def rejected_example(self) -> "Example":
        """The same prompt answered with the rejected answer (a plain Example)."""
        return Example(self.prompt_messages() + (Message("assistant", self.rejected, True),),
                       path=self.path, line=self.line)

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
