"""An Ollama Modelfile that reproduces the chat format a model was fine-tuned with.

    pieces = template_pieces(tokenizer)          # derived from the Jinja template, then verified
    text = modelfile("model.gguf", pieces, stop=["<|im_end|>"], system=None, run="soporte")
    (folder / "Modelfile").write_text(text, encoding="utf-8")
    print(create_command(folder, valid_model_name("soporte")))   # cd ... && ollama create ...

The training format is whatever `tokenizer.apply_chat_template` renders. Ollama renders a Go
text/template instead, so we split the Jinja output of probe conversations into fixed literal
pieces (what comes before/after each role's content), rebuild the text from the pieces with
`render` (a Python twin of the Go template we write) and refuse to export unless both agree on
every check conversation: a model served with a subtly different prompt format degrades quietly.

How Ollama fills the template (ollama/ollama template/template.go, server/routes.go): a Modelfile
SYSTEM is prepended as a system message only when the request does not start with one; `.System`
is every system message joined with "\\n\\n"; `.Messages` still holds the system messages (so the
range must skip them), with consecutive same-role messages merged with "\\n\\n". The Modelfile
parser does no escape processing in quoted values and silently drops non-printable characters.
"""

from __future__ import annotations

import re
import shlex
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from afinar.errors import AfinarError

_SYS, _U1, _A1, _U2 = "AFINARSYS1", "AFINARUSER1", "AFINARASSISTANT1", "AFINARUSER2"
_HINT = ("export as gguf only and write the Modelfile TEMPLATE by hand "
         "(https://github.com/ollama/ollama/blob/main/docs/template.md)")


@dataclass(frozen=True)
class TemplatePieces:
    always_prefix: str          # emitted first in every prompt (e.g. a BOS string); may be ""
    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str       # == generation_prompt: Ollama's template has a single place for it
    assistant_suffix: str
    generation_prompt: str
    default_system: str | None  # what the template injects when the conversation has no system


def _refuse(what: str) -> AfinarError:
    return AfinarError(f"cannot express this chat template as an Ollama TEMPLATE: {what}", _HINT)


def _jinja(tokenizer, messages: list[dict], generation: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=generation)
    except Exception as exc:  # jinja raise_exception(): rejected roles, required alternation...
        roles = ", ".join(m["role"] for m in messages)
        raise _refuse(f"it cannot render a [{roles}] conversation ({exc})") from None


def _around(text: str, sentinel: str) -> tuple[str, str]:
    if text.count(sentinel) != 1:  # dropped, duplicated or rewritten content: no fixed pieces
        raise _refuse(f"a probe message's content appears {text.count(sentinel)} times")
    before, after = text.split(sentinel)
    return before, after


def _strip_end(text: str, end: str, what: str) -> str:
    if not text.endswith(end):
        raise _refuse(f"{what} is not the same in every position")
    return text[:len(text) - len(end)]


def template_pieces(tokenizer) -> TemplatePieces:
    """Derive the literal pieces from probe renderings, then prove them on check conversations."""
    u1, a1, u2 = ({"role": r, "content": c} for r, c in
                  (("user", _U1), ("assistant", _A1), ("user", _U2)))
    # Sentinels have no whitespace, so `| trim` in a template cannot move the cut points.
    bare = _jinja(tokenizer, [u1], False)
    with_gen = _jinja(tokenizer, [u1], True)
    if not with_gen.startswith(bare):
        raise _refuse("the generation prompt is not appended at the end")
    generation = with_gen[len(bare):]
    head_u, _ = _around(bare, _U1)
    between, assistant_suffix = _around(_around(_jinja(tokenizer, [u1, a1], False), _U1)[1], _A1)
    # Ollama's template has one assistant opener, used both for history and for generation.
    user_suffix = _strip_end(between, generation, "the assistant turn opener")
    after_a, _ = _around(_around(_jinja(tokenizer, [u1, a1, u2], False), _A1)[1], _U2)
    if not after_a.startswith(assistant_suffix):
        raise _refuse("the end of an assistant turn is not the same in every position")
    user_prefix = after_a[len(assistant_suffix):]
    head_s, rest = _around(_jinja(tokenizer, [{"role": "system", "content": _SYS}, u1], False),
                           _SYS)
    system_suffix = _strip_end(_around(rest, _U1)[0], user_prefix, "the user turn opener")
    first = _strip_end(head_u, user_prefix, "the user turn opener")  # before the first user turn
    if head_s.startswith(first):  # nothing injected: `first` is the always-emitted prefix
        always, system_prefix, default = first, head_s[len(first):], None
    elif first.startswith(head_s) and first.endswith(system_suffix):
        default = first[len(head_s):len(first) - len(system_suffix)]
        if not default:  # `{{ if .System }}` cannot write a block for an empty system prompt
            raise _refuse("it writes an empty system block when there is no system message")
        # The system block is always there, so where "always" ends is invisible; a BOS is the
        # one prefix that belongs outside it (unless it opens every turn, as in SmolLM2).
        bos = getattr(tokenizer, "bos_token", None) or ""
        outside = bos and head_s.startswith(bos) and not user_prefix.startswith(bos)
        always = bos if outside else ""
        system_prefix = head_s[len(always):]
    else:
        raise _refuse("what it writes before the first user turn without a system message")
    pieces = TemplatePieces(always, system_prefix, system_suffix, user_prefix, user_suffix,
                            generation, assistant_suffix, generation, default)
    _verify(tokenizer, pieces)
    return pieces


def _check_conversations() -> list[list[dict]]:
    # Lowercase, accents, inner newlines and spaces: catches templates that transform content.
    turns = [("user", "hola, ¿qué tal?\nsegunda línea"), ("assistant", "Bien: todo {ok}."),
             ("user", "otra pregunta"), ("assistant", "otra respuesta\n- punto"),
             ("user", "y la última")]
    system = {"role": "system", "content": "Eres un asistente.\nResponde en español."}
    convs = []
    for n in range(1, len(turns) + 1):
        conv = [{"role": r, "content": c} for r, c in turns[:n]]
        convs += [conv, [system, *conv]]
    return convs


def _verify(tokenizer, pieces: TemplatePieces) -> None:
    for conv in _check_conversations():
        for generation in (True, False):
            expected = _jinja(tokenizer, conv, generation)
            got = render(pieces, conv, system=pieces.default_system,
                         add_generation_prompt=generation)
            if got != expected:
                at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b),
                          min(len(got), len(expected)))
                roles = ", ".join(m["role"] for m in conv)
                raise _refuse(
                    f"for a [{roles}] conversation (generation prompt: {generation}) it writes "
                    f"{expected[at:at + 40]!r} at character {at}, the pieces give "
                    f"{got[at:at + 40]!r}")


def render(pieces: TemplatePieces, messages: list[dict], system: str | None = None,
           add_generation_prompt: bool = True) -> str:
    """The text `go_template(pieces)` produces in Ollama for `messages` (SYSTEM = `system`)."""
    msgs = [dict(m) for m in messages]
    if system and msgs and msgs[0]["role"] != "system":  # server/routes.go's rule
        msgs.insert(0, {"role": "system", "content": system})
    merged: list[dict] = []
    for m in msgs:  # Ollama merges consecutive messages of the same role
        if merged and merged[-1]["role"] == m["role"] and m["role"] != "tool":
            merged[-1]["content"] += "\n\n" + m["content"]
        else:
            merged.append(m)
    out = [pieces.always_prefix]
    all_system = "\n\n".join(m["content"] for m in msgs if m["role"] == "system")
    if all_system:
        out += [pieces.system_prefix, all_system, pieces.system_suffix]
    for m in merged:
        if m["role"] == "user":
            out += [pieces.user_prefix, m["content"], pieces.user_suffix]
        elif m["role"] == "assistant":
            out += [pieces.assistant_prefix, m["content"], pieces.assistant_suffix]
    if add_generation_prompt:
        out.append(pieces.generation_prompt)
    return "".join(out)


def _literal(text: str) -> str:
    # Go's lexer opens an action at "{{", also one formed with the next action's braces, so
    # every "{" becomes an action printing a string constant.
    return text.replace("{", '{{ "{" }}')


def go_template(pieces: TemplatePieces, *, include_always_prefix: bool = True) -> str:
    """The Modelfile TEMPLATE. Drop the always-prefix when it is a BOS the GGUF adds itself."""
    p = {k: _literal(v or "") for k, v in vars(pieces).items()}
    return ((p["always_prefix"] if include_always_prefix else "")
            + f'{{{{ if .System }}}}{p["system_prefix"]}{{{{ .System }}}}{p["system_suffix"]}'
            + '{{ end }}{{ range .Messages }}{{ if eq .Role "user" }}'
            + f'{p["user_prefix"]}{{{{ .Content }}}}{p["user_suffix"]}'
            + '{{ else if eq .Role "assistant" }}'
            + f'{p["assistant_prefix"]}{{{{ .Content }}}}{p["assistant_suffix"]}'
            + f'{{{{ end }}}}{{{{ end }}}}{p["generation_prompt"]}')


def _printable(text: str, what: str) -> None:
    # Ollama's Modelfile parser keeps only printable runes plus spaces, tabs and newlines.
    bad = sorted({c for c in text if not c.isprintable() and c not in "\n\t"})
    if bad:
        raise AfinarError(f"the {what} contains characters a Modelfile cannot carry: {bad!r}",
                          _HINT)


def _block(keyword: str, text: str, what: str) -> str:
    _printable(text, what)
    if '"""' in text:  # the parser has no escapes: this would end the block early
        raise AfinarError(f'the {what} contains """, which cannot go in a Modelfile', _HINT)
    return f'{keyword} """{text}"""'


def _quoted(value: str, what: str) -> str:
    # Modelfile values are taken verbatim between the quotes (no escapes): JSON quoting would
    # keep its backslashes, so a value with a quote is refused instead.
    _printable(value, what)
    if not value or '"' in value:
        raise AfinarError(f"the {what} {value!r} cannot be written in a Modelfile",
                          "leave it out or set it after `ollama create`")
    return f'"{value}"'


def modelfile(gguf_filename: str, pieces: TemplatePieces, stop: list[str], system: str | None,
              parameters: dict | None = None, *, run: str | None = None,
              include_always_prefix: bool = True) -> str:
    """The Modelfile text; `system` defaults to the system prompt the template injects."""
    if not gguf_filename or re.search(r'[/\\\n"]', gguf_filename):
        raise AfinarError(f"{gguf_filename!r} is not a plain file name for FROM")
    about = re.sub(r"\s+", " ", f" from run {run}" if run else "")
    lines = [f"# Written by afinar{about}.",
             "# TEMPLATE, stop strings and SYSTEM reproduce the chat format it was trained with.",
             f"FROM ./{gguf_filename}", "",
             _block("TEMPLATE", go_template(pieces, include_always_prefix=include_always_prefix),
                    "chat template")]
    lines += [f"PARAMETER stop {_quoted(s, 'stop string')}" for s in dict.fromkeys(stop)]
    for key, value in (parameters or {}).items():
        if not re.fullmatch(r"[a-z][a-z0-9_]*", key):
            raise AfinarError(f"{key!r} is not an Ollama parameter name")
        for v in value if isinstance(value, (list, tuple)) else [value]:
            text = str(v).lower() if isinstance(v, bool) else str(v)
            lines.append(f"PARAMETER {key} "
                         + (text if isinstance(v, (int, float)) else _quoted(text, key)))
    system = system if system is not None else pieces.default_system
    if system:
        lines.append(_block("SYSTEM", system, "system prompt"))
    return "\n".join(lines) + "\n"


def valid_model_name(name: str, prefix: str = "afinar-") -> str:
    """A legal Ollama model name from a run name: "Soporte Triaje" -> "afinar-soporte-triaje"."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9_.-]+", "-", ascii_name.lower())
    slug = re.sub(r"\.{2,}", ".", slug).strip("-._")  # must start with a letter/digit, no ".."
    base = prefix.strip("-._")
    if base and not slug.startswith(base):
        slug = f"{prefix}{slug}" if slug else base
    slug = slug[:80].rstrip("-._")
    return slug if len(slug) >= 2 else "afinar-model"  # some Ollama versions want 2+ chars


def create_command(folder: Path, name: str) -> str:
    """The shell command that registers the exported model with a local Ollama."""
    return f"cd {shlex.quote(str(folder))} && ollama create {shlex.quote(name)} -f Modelfile"
