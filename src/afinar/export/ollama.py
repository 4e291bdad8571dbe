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
The tests render the TEMPLATE itself with Go's text/template (tests/ollama_template/render.go)
and compare it byte for byte with the Jinja text, for every model family.

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
# Where a template puts the system prompt: its own block (`own`), its own block written even
# when there is none (`own_always`, as Llama 3.1 does with an empty one), or inside the first
# or the last user turn (Gemma, Mistral), followed by `system_separator`.
SYSTEM_MODES = ("own", "own_always", "first_user", "last_user")


@dataclass(frozen=True)
class TemplatePieces:
    always_prefix: str          # emitted first in every prompt (e.g. a BOS string); may be ""
    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str       # opens an assistant turn of the history
    assistant_suffix: str
    generation_prompt: str      # written after the last message, where the model answers
    default_system: str | None  # what the template injects when the conversation has no system
    system_mode: str = "own"
    system_separator: str = ""  # between the system prompt and a user turn's text (*_user)


def _refuse(what: str) -> AfinarError:
    return AfinarError(f"cannot express this chat template as an Ollama TEMPLATE: {what}", _HINT)


def _jinja(tokenizer, messages: list[dict], generation: bool, prepare=None) -> str:
    try:
        return tokenizer.apply_chat_template(prepare(messages) if prepare else messages,
                                             tokenize=False, add_generation_prompt=generation)
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


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _common_suffix(a: str, b: str) -> str:
    return _common_prefix(a[::-1], b[::-1])[::-1]


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def template_pieces(tokenizer, prepare=None) -> TemplatePieces:
    """Derive the literal pieces from probe renderings, then prove them on check conversations.

    `prepare` turns a conversation into what the template is given (afinar's encoder joins a
    system message to the first user turn where the template refuses one: `renderable`).

    Only prompts that end with a user turn and the generation prompt are derived and checked:
    they are what Ollama renders to answer. A template may render earlier answers differently
    from the last one (Qwen3's empty <think> block), which no per-role piece could reproduce,
    and which no prompt for a new answer contains."""
    u1, a1, u2 = _msg("user", _U1), _msg("assistant", _A1), _msg("user", _U2)
    # Sentinels have no whitespace, so `| trim` in a template cannot move the cut points.
    first_prompt = _jinja(tokenizer, [u1], True, prepare)
    head_user, tail = _around(first_prompt, _U1)  # tail: user turn end + generation prompt
    before, rest = _around(_jinja(tokenizer, [u1, a1, u2], True, prepare), _U1)
    if before != head_user:
        raise _refuse("what it writes before the first user turn depends on what follows")
    user_to_answer, rest = _around(rest, _A1)
    answer_to_user, last_tail = _around(rest, _U2)
    if last_tail != tail:
        raise _refuse("the end of a user turn is not the same in every position")
    # Where the user turn ends and the assistant opener starts: as far as the template's own
    # rendering of a conversation that stops after a user turn agrees (Phi-3 writes an EOS
    # there, which no prompt for an answer has).
    bare_after = _around(_jinja(tokenizer, [u1], False, prepare), _U1)[1]
    user_suffix = _common_prefix(_common_prefix(tail, user_to_answer), bare_after)
    generation, assistant_prefix = tail[len(user_suffix):], user_to_answer[len(user_suffix):]
    # A user turn's opener ends both the text before the first user turn and the text between
    # an answer and the next user turn; where the answer ends, the template's rendering of a
    # conversation that stops after an answer says, as far as it agrees.
    opener = _common_suffix(answer_to_user, head_user)
    hint = _around(_jinja(tokenizer, [u1, a1], False, prepare), _A1)[1]
    cut = len(_common_prefix(hint, answer_to_user))
    cut = max(cut, len(answer_to_user) - len(opener))
    assistant_suffix, user_prefix = answer_to_user[:cut], answer_to_user[cut:]
    head = _strip_end(head_user, user_prefix, "the user turn opener")
    system = _system_pieces(tokenizer, prepare, head, user_prefix, user_to_answer, answer_to_user,
                            tail)
    pieces = TemplatePieces(user_prefix=user_prefix, user_suffix=user_suffix,
                            assistant_prefix=assistant_prefix, assistant_suffix=assistant_suffix,
                            generation_prompt=generation, **system)
    _verify(tokenizer, pieces, prepare)
    return pieces


def _system_pieces(tokenizer, prepare, head: str, user_prefix: str, user_to_answer: str,
                   answer_to_user: str, tail: str) -> dict:
    """always_prefix, system_prefix/suffix, default_system, system_mode and separator."""
    u1, a1, u2, s = _msg("user", _U1), _msg("assistant", _A1), _msg("user", _U2), \
        _msg("system", _SYS)
    with_system = _jinja(tokenizer, [s, u1], True, prepare)
    longer = _jinja(tokenizer, [s, u1, a1, u2], True, prepare)
    _around(longer, _SYS)
    opened = head + user_prefix
    if longer.index(_SYS) > longer.index(_A1):  # joined to the last user turn (Mistral)
        separator = _around(_around(longer, _SYS)[1], _U2)[0]
        expected = (opened + _U1 + user_to_answer + _A1 + answer_to_user + _SYS + separator
                    + _U2 + tail)
        mode = "last_user"
    elif with_system.startswith(opened + _SYS):  # inside the first user turn (Gemma)
        separator = _around(_around(with_system, _SYS)[1], _U1)[0]
        expected = (opened + _SYS + separator + _U1 + user_to_answer + _A1 + answer_to_user
                    + _U2 + tail)
        mode = "first_user"
    else:
        return _own_system_block(tokenizer, with_system, head, user_prefix)
    if longer != expected:
        raise _refuse("where it puts the system prompt differs from one conversation to another")
    return dict(always_prefix=head, system_prefix="", system_suffix="", default_system=None,
                system_mode=mode, system_separator=separator)


def _own_system_block(tokenizer, with_system: str, head: str, user_prefix: str) -> dict:
    head_s, rest = _around(with_system, _SYS)
    system_suffix = _strip_end(_around(rest, _U1)[0], user_prefix, "the user turn opener")
    mode, default = "own", None
    if head_s.startswith(head):  # nothing injected: `head` is the always-emitted prefix
        always, system_prefix = head, head_s[len(head):]
    elif head.startswith(head_s) and head.endswith(system_suffix):
        default = head[len(head_s):len(head) - len(system_suffix)]
        if not default:  # an empty system block is written when there is none (Llama 3.1)
            mode, default = "own_always", None
        # The system block is always there, so where "always" ends is invisible; a BOS is the
        # one prefix that belongs outside it (unless it opens every turn, as in SmolLM2).
        bos = getattr(tokenizer, "bos_token", None) or ""
        outside = bos and head_s.startswith(bos) and not user_prefix.startswith(bos)
        always = bos if outside else ""
        system_prefix = head_s[len(always):]
    else:
        raise _refuse("what it writes before the first user turn without a system message")
    return dict(always_prefix=always, system_prefix=system_prefix, system_suffix=system_suffix,
                default_system=default, system_mode=mode)


def check_conversations() -> list[list[dict]]:
    """Prompts for a new answer: one to three user turns, with and without a system message.
    Lowercase, accents, inner newlines and spaces catch templates that transform content."""
    turns = [("user", "hola, ¿qué tal?\nsegunda línea"), ("assistant", "Bien: todo {ok}."),
             ("user", "otra pregunta"), ("assistant", "otra respuesta\n- punto"),
             ("user", "y la última")]
    system = {"role": "system", "content": "Eres un asistente.\nResponde en español."}
    convs = []
    for n in (1, 3, 5):
        conv = [{"role": r, "content": c} for r, c in turns[:n]]
        convs += [conv, [system, *conv]]
    return convs


def _verify(tokenizer, pieces: TemplatePieces, prepare=None) -> None:
    for conv in check_conversations():
        expected = _jinja(tokenizer, conv, True, prepare)
        got = render(pieces, conv, system=pieces.default_system)
        if got != expected:
            at = len(_common_prefix(got, expected))
            roles = ", ".join(m["role"] for m in conv)
            raise _refuse(
                f"for a [{roles}] conversation it writes {expected[at:at + 40]!r} at character "
                f"{at}, the pieces give {got[at:at + 40]!r}")


def ollama_messages(messages: list[dict], system: str | None = None) -> tuple[str, list[dict]]:
    """(.System, .Messages) as Ollama fills them (server/routes.go, template/template.go): the
    Modelfile SYSTEM only when the request has no system message; consecutive messages of one
    role merged with a blank line; system messages kept in .Messages too."""
    msgs = [dict(m) for m in messages]
    if system and msgs and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    merged: list[dict] = []
    for m in msgs:
        if merged and merged[-1]["role"] == m["role"] and m["role"] != "tool":
            merged[-1]["content"] += "\n\n" + m["content"]
        else:
            merged.append(m)
    return "\n\n".join(m["content"] for m in msgs if m["role"] == "system"), merged


def render(pieces: TemplatePieces, messages: list[dict], system: str | None = None,
           add_generation_prompt: bool = True) -> str:
    """The text `go_template(pieces)` produces in Ollama for `messages` (SYSTEM = `system`)."""
    all_system, merged = ollama_messages(messages, system)
    out = [pieces.always_prefix]
    if pieces.system_mode == "own_always" or (pieces.system_mode == "own" and all_system):
        out += [pieces.system_prefix, all_system, pieces.system_suffix]
    pending = all_system if pieces.system_mode == "first_user" else ""
    for k, m in enumerate(merged):
        if m["role"] == "user":
            out.append(pieces.user_prefix)
            last = k == len(merged) - 1
            if pending or (pieces.system_mode == "last_user" and last and all_system):
                out += [pending or all_system, pieces.system_separator]
                pending = ""
            out += [m["content"], pieces.user_suffix]
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
    """The Modelfile TEMPLATE. Drop the always-prefix when it is a BOS the GGUF adds itself.

    Ollama's variables: .System (every system message, or the Modelfile SYSTEM) and .Messages
    (each with .Role and .Content; system messages included, so the range skips them)."""
    p = {k: _literal(v or "") for k, v in vars(pieces).items()}
    mode = pieces.system_mode
    own = f'{p["system_prefix"]}{{{{ .System }}}}{p["system_suffix"]}'
    system_block = {"own": f"{{{{ if .System }}}}{own}{{{{ end }}}}", "own_always": own}
    # Inside a user turn: the first one (Gemma) takes .System once, then the variable is
    # emptied; the last message (Mistral; a prompt for a new answer ends with a user turn).
    in_user = {
        "first_user": f'{{{{ if $system }}}}{{{{ $system }}}}{p["system_separator"]}'
                      '{{ $system = "" }}{{ end }}',
        "last_user": f'{{{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}}}'
                     f'{{{{ $.System }}}}{p["system_separator"]}{{{{ end }}}}'}
    return ((p["always_prefix"] if include_always_prefix else "")
            + system_block.get(mode, "")
            + ('{{ $system := .System }}' if mode == "first_user" else "")
            + ('{{ range $i, $m := .Messages }}' if mode == "last_user" else
               '{{ range .Messages }}')
            + '{{ if eq .Role "user" }}'
            + f'{p["user_prefix"]}{in_user.get(mode, "")}{{{{ .Content }}}}{p["user_suffix"]}'
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
