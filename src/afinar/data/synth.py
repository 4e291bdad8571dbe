"""Synthetic examples from any OpenAI-compatible chat endpoint (OpenAI, Ollama, vLLM, llama.cpp's
server, a local `afinar serve`): from topics, seed examples or documents.

    settings = SynthSettings(base_url="http://127.0.0.1:11434/v1", model="qwen2.5:7b",
                             topics=["envíos", "devoluciones"], count=50)
    result = synthesize(settings, "synth.jsonl", on_progress=print)

Each request asks for a few question/answer pairs as JSON (with `response_format` where the
server supports it) and every reply is checked here: parsed, each pair validated as a chat
example, and dropped when it repeats (or nearly repeats) a seed or an example already kept.
Network errors and 429/5xx answers are retried with exponential back-off. Examples are appended
to OUTPUT.partial as they are accepted, so an interrupted run resumes where it stopped; the file
is renamed to OUTPUT only once `count` examples are in it.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from afinar.data.dedupe import normalise
from afinar.data.example import Example, Message
from afinar.data.formats import FORMATS
from afinar.data.issues import IssueSink
from afinar.data.writers import to_record
from afinar.errors import AfinarError

RETRIABLE = {408, 409, 425, 429, 500, 502, 503, 504}
_JSON_START = re.compile(r"[\[{]")
_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["examples"],
    "properties": {"examples": {"type": "array", "items": {
        "type": "object", "additionalProperties": False, "required": ["question", "answer"],
        "properties": {"question": {"type": "string"}, "answer": {"type": "string"}}}}}}
INSTRUCTIONS = (
    "You write training examples for fine-tuning a chat assistant. Reply with JSON only, no "
    'other text: {"examples": [{"question": "...", "answer": "..."}, ...]}. Every question is '
    "one a real user could ask; every answer is the complete reply the assistant should give. "
    "No two examples alike.")


@dataclass
class SynthSettings:
    base_url: str
    model: str
    count: int = 20
    topics: list[str] = field(default_factory=list)
    seeds: list[Example] = field(default_factory=list)
    documents: list[str] = field(default_factory=list)  # text chunks
    system: str | None = None  # the system prompt the written examples carry
    language: str | None = None  # e.g. "Spanish"
    per_request: int = 5
    temperature: float = 0.9
    max_tokens: int = 1024
    similarity: float = 0.85  # from this question similarity on, an example is a duplicate
    retries: int = 5
    timeout: float = 120
    api_key: str | None = None
    seed: int = 0
    max_requests: int | None = None  # default: 4 requests per example wanted


@dataclass
class SynthResult:
    output: Path
    written: int  # examples in the output, including those of a resumed run
    requests: int = 0
    generated: int = 0  # pairs the model returned
    invalid: int = 0  # unparseable replies or pairs that are not valid examples
    duplicates: int = 0
    retried: int = 0
    seconds: float = 0.0
    complete: bool = False


# --- HTTP ---------------------------------------------------------------------------------------

def _post(settings: SynthSettings, body: dict, result: SynthResult,
          sleep: Callable[[float], None] = time.sleep) -> dict:
    url = settings.base_url.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json",
               "Authorization": f"Bearer {settings.api_key or 'sk-no-key'}"}
    data = json.dumps(body).encode()
    for attempt in range(settings.retries + 1):
        try:
            request = urllib.request.Request(url, data=data, headers=headers, method="POST")
            with urllib.request.urlopen(request, timeout=settings.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = _error_text(exc)
            if exc.code not in RETRIABLE or attempt == settings.retries:
                raise _http_error(settings, exc.code, detail) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            if attempt == settings.retries:
                raise AfinarError(f"{url}: cannot reach the endpoint ({exc})",
                                  "check --base-url and that the server is running") from None
        result.retried += 1
        sleep(min(60.0, 2 ** attempt) * (0.5 + random.random()))  # back-off with jitter
    raise AssertionError("unreachable")


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read())
        return str(body.get("error", {}).get("message") or body)
    except (ValueError, AttributeError, OSError):
        return exc.reason or ""


def _http_error(settings: SynthSettings, code: int, detail: str) -> AfinarError:
    hints = {401: "set the key in the environment variable --api-key-env names",
             403: "the key may not use this model", 404: "check --model and --base-url (it "
             "usually ends in /v1)"}
    return AfinarError(f"{settings.base_url}: HTTP {code}: {detail}",
                       hints.get(code, "see the server's message above"))


# --- prompts and replies ------------------------------------------------------------------------

def _prompts(settings: SynthSettings, rng: random.Random):
    """Endless user prompts cycling over the sources; seed examples show the style in each."""
    sources = ([("topic", t) for t in settings.topics] +
               [("document", d) for d in settings.documents]) or [("seeds", None)]
    language = f" Write them in {settings.language}." if settings.language else ""
    while True:
        for kind, value in sources:
            shown = rng.sample(settings.seeds, min(3, len(settings.seeds)))
            style = "".join(f"\nExample: {json.dumps(_pair(ex), ensure_ascii=False)}"
                            for ex in shown)
            n = settings.per_request
            if kind == "topic":
                ask = f"Write {n} question/answer pairs about: {value}."
            elif kind == "document":
                ask = (f"Write {n} question/answer pairs that this text answers; the answers "
                       f"use only what it says.\n\n---\n{value}\n---")
            else:
                ask = (f"Write {n} new question/answer pairs in the same domain and style as "
                       "the examples below, without repeating them.")
            yield ask + language + (f"\nStyle to follow:{style}" if style else "")


def _pair(example: Example) -> dict:
    return {"question": "\n".join(m.content for m in example.prompt_messages()
                                  if m.role == "user"),
            "answer": example.final_answer()}


def parse_reply(content: str) -> list[dict] | None:
    """The pairs in a model's reply: a JSON object with `examples`, a list, or one pair; the
    JSON may sit inside prose or a code fence. None when there is no such JSON."""
    decoder = json.JSONDecoder()
    for match in _JSON_START.finditer(content or ""):
        try:
            value, _ = decoder.raw_decode(content, match.start())
        except ValueError:
            continue
        if isinstance(value, dict) and isinstance(value.get("examples"), list):
            return value["examples"]
        if isinstance(value, list):
            return value
        if isinstance(value, dict) and "question" in value:
            return [value]
    return None


def to_example(pair, system: str | None) -> Example | None:
    """A generated pair as a validated chat example, or None (the same checks as a data file)."""
    if not isinstance(pair, dict):
        return None
    question, answer = pair.get("question"), pair.get("answer")
    if not isinstance(question, str) or not isinstance(answer, str):
        return None
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question.strip()},
        {"role": "assistant", "content": answer.strip()}]
    issues: list = []
    example = FORMATS["chat"].parse({"messages": messages}, IssueSink("synth", 0, issues))
    return None if issues or example is None else example


# --- the run ------------------------------------------------------------------------------------

def _partial(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def _read_partial(path: Path) -> list[Example]:
    examples = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            issues: list = []
            example = FORMATS["chat"].parse(record, IssueSink(str(path), 0, issues))
            if example is not None and not issues:
                examples.append(example)
    return examples


def synthesize(settings: SynthSettings, output: str | Path,
               on_progress: Callable[[SynthResult], None] | None = None,
               sleep: Callable[[float], None] = time.sleep) -> SynthResult:
    from rapidfuzz import fuzz, process

    output = Path(output)
    partial = _partial(output)
    if output.exists():
        raise AfinarError(f"{output} already exists", "choose another --output, or delete it")
    if not (settings.topics or settings.seeds or settings.documents):
        raise AfinarError("nothing to generate from", "give --topic, --seeds or --documents")
    kept = _read_partial(partial)  # a resumed run keeps what it had
    known = [normalise(_pair(ex)["question"]) for ex in settings.seeds + kept]
    result = SynthResult(output, len(kept))
    rng = random.Random(settings.seed + len(kept))
    max_requests = settings.max_requests or 4 * settings.count
    started = time.perf_counter()
    prompts = _prompts(settings, rng)
    partial.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "a", encoding="utf-8") as sink:
        while result.written < settings.count and result.requests < max_requests:
            body = {"model": settings.model, "temperature": settings.temperature,
                    "max_tokens": settings.max_tokens,
                    "messages": [{"role": "system", "content": INSTRUCTIONS},
                                 {"role": "user", "content": next(prompts)}],
                    "response_format": {"type": "json_schema", "json_schema": {
                        "name": "examples", "strict": True, "schema": _SCHEMA}}}
            reply = _post(settings, body, result, sleep)
            result.requests += 1
            content = ((reply.get("choices") or [{}])[0].get("message") or {}).get("content")
            pairs = parse_reply(content or "")
            if pairs is None:
                result.invalid += 1
            for pair in pairs or []:
                result.generated += 1
                example = to_example(pair, settings.system)
                if example is None:
                    result.invalid += 1
                    continue
                question = normalise(_pair(example)["question"])
                if process.extractOne(question, known, scorer=fuzz.ratio,
                                      score_cutoff=settings.similarity * 100):
                    result.duplicates += 1
                    continue
                known.append(question)
                sink.write(json.dumps(to_record(example, "chat"), ensure_ascii=False) + "\n")
                sink.flush()
                os.fsync(sink.fileno())  # a kill loses at most the line being written
                result.written += 1
                if result.written >= settings.count:
                    break
            result.seconds = time.perf_counter() - started
            if on_progress:
                on_progress(result)
    result.seconds = time.perf_counter() - started
    if result.written >= settings.count:
        os.replace(partial, output)
        result.complete = True
    return result


def chunk_documents(paths: list[Path], size: int = 1500) -> list[str]:
    """Text chunks of about `size` characters, cut at blank lines, from .md/.txt files (or the
    files inside folders)."""
    files = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in (".md", ".txt"))
        elif path.is_file():
            files.append(path)
        else:
            raise AfinarError(f"{path}: no such file or folder")
    chunks = []
    for file in files:
        current = ""
        for block in re.split(r"\n\s*\n", file.read_text(encoding="utf-8", errors="replace")):
            if current and len(current) + len(block) > size:
                chunks.append(current.strip())
                current = ""
            current += block + "\n\n"
        if current.strip():
            chunks.append(current.strip())
    if not chunks:
        raise AfinarError("the documents hold no text", "give .md or .txt files")
    return chunks
