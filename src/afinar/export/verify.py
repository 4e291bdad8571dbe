"""Checks that an export behaves like the trained model: same prompt token ids, same greedy answer.

Golden prompts come from the run's held-out split. The trained model (transformers, base +
adapter merged in fp32; for a QLoRA run, into the de-quantised base it was trained against)
answers each greedily; so does the export (llama.cpp for GGUF, plain
`transformers` with only the exported folder for merged weights). Types that keep every weight
to 16 bits or more must agree token for token on the first `exact_tokens` tokens of every answer;
quantised types are judged by teacher forcing: given the trained model's own answer so far, the
export must choose the same next token for at least `min_agreement` of the answer's tokens. (Free
greedy answers are reported too, but one early near-tie flip changes every token after it, so
their common prefix says more about where the first flip fell, which differs from CPU to CPU,
than about the quantisation.)

A GGUF file carries its own tokenizer and chat template, and either can go wrong without a
greedy answer showing it at once; for llama.cpp exports two more checks run (`llama_checks`):
- tokenizer: llama.cpp's token ids equal the trained tokenizer's on fixed strings (Spanish
  accents, emoji, digits, code, whitespace runs, the family's special tokens written as text;
  each after the prompt's opening control token where the tokenizer's "▁" rule depends on
  position, see probe_lead);
- chat prompt: the GGUF's own chat template and BOS/EOS, rendered by llama.cpp's chat handler
  (llama-cpp-python's chat completion with the file's `tokenizer.chat_template`), give the same
  prompt ids as the trained model's template on probe conversations (with and without a system
  message, several turns).
A mismatch fails the export and names the first differing string.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

from afinar.errors import AfinarError
from afinar.export.space_prefix import space_prefix_only_at_start

EXACT_TYPES = ("f32", "f16", "bf16")
# Exact types may part from the reference only at a near-tie: where the reference's own logits
# for its token and the export's token differ by less than this share of the logits' spread.
# These are the logit errors the round-trip tests allow each type (llama.cpp computes f16/bf16
# matmuls with activations rounded to the weights' type, so bit-equality is not on offer).
TIE_TOLERANCE = {"f32": 1e-3, "f16": 2e-3, "bf16": 1.5e-2}


def default_min_agreement(kind: str) -> float:
    """Teacher-forced token agreement a quantised type must reach unless told otherwise.
    Small models feel quantisation most: the demo run of SmolLM2-135M measured q8_0 0.956,
    q6_k 0.972, q4_k_m 0.912, q4_0 0.789 on an AVX2 CPU (bench/README.md); these leave room."""
    kind = kind.lower()
    if kind == "q8_0":
        return 0.9
    if kind.startswith(("q6", "q5")):
        return 0.85
    if kind.startswith("q4"):
        return 0.7
    return 0.5  # q3, q2

# Strings llama.cpp's tokenizer must split exactly as the trained tokenizer does: accents,
# digits, runs of spaces and newlines, code, emoji and chat control tokens written as text.
TOKENIZER_PROBES = (
    "Hola, ¿qué tal? Mañana envío el pedido nº 12345 a las 09:30.",
    "The quick brown fox jumps over 3.14159 lazy dogs!!! 2026-11-21",
    "  leading spaces\n\n\ttabs\r\nand CRLF   trailing   ",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment",
    "Ünïcödé — “quotes” 😀 日本語 Ελληνικά",
    "I'm sure you'll see they've done it. DON'T SHOUT.",
    "0 1 12 123 1234 12345 123456 1234567 3.14159 1,000,000 +34 600 123 456 x2=4",
)
# Conversations whose prompt must come out the same from the GGUF's own template: no system
# message, a system message, several turns, and text that templates and tokenizers trip on.
CHAT_PROBES = (
    [{"role": "user", "content": "¿Dónde está mi pedido nº 1234? 📦"}],
    [{"role": "system", "content": "Eres un asistente de soporte.\nResponde en español."},
     {"role": "user", "content": "El envío llegó roto."}],
    [{"role": "user", "content": "hola"}, {"role": "assistant", "content": "¡Hola! ¿En qué te ayudo?"},
     {"role": "user", "content": "def f(x):\n    return {'a': [1, 2]}"}],
    [{"role": "system", "content": "Sé breve."}, {"role": "user", "content": "uno"},
     {"role": "assistant", "content": "dos"}, {"role": "user", "content": "  tres  "}],
)


def reference_name(qlora: str | None, detail: str = "fp32") -> str:
    """What the export is compared with, as the report says it."""
    merged = (f"adapter merged into the de-quantised {qlora} base it was trained against"
              if qlora else "adapter merged")
    return f"trained model (transformers, {detail}, {merged})"


class VerificationFailed(AfinarError):
    def __init__(self, message: str, report: "VerifyReport"):
        super().__init__(message, "the export was not kept; see the verification report "
                                  f"{report.saved_to or ''}".rstrip())
        self.report = report


@dataclass
class PromptResult:
    prompt: str
    same_prompt_ids: bool
    reference: str
    export: str
    reference_tokens: int
    export_tokens: int
    agreed_tokens: int  # common prefix of the two answers, within the compared window
    compared_tokens: int
    identical: bool  # the whole answers are the same token ids
    export_stopped: bool  # the export ended with an end-of-turn token by itself
    near_tie: float | None = None  # at a divergence: reference logit margin / logit spread
    # Teacher forcing: tokens of the reference answer the export also chose, given the same
    # preceding tokens (quantised types only).
    forced_agreed: int | None = None
    forced_compared: int | None = None


@dataclass
class VerifyReport:
    kind: str
    engine: str
    exact_required: bool
    exact_tokens: int
    min_agreement: float
    prompts: list[PromptResult] = field(default_factory=list)
    tokenizer_mismatches: list[str] = field(default_factory=list)
    # Probe conversations whose prompt ids from the GGUF's own chat template differ (described).
    chat_template_mismatches: list[str] = field(default_factory=list)
    # The control token each tokenizer probe was checked after ("": checked alone); see
    # probe_lead.
    tokenizer_probe_lead: str = ""
    reference: str = reference_name(None)
    passed: bool = False
    problems: list[str] = field(default_factory=list)
    saved_to: str | None = None

    @property
    def agreement(self) -> float:
        compared = sum(p.compared_tokens for p in self.prompts)
        return sum(p.agreed_tokens for p in self.prompts) / compared if compared else 1.0

    @property
    def forced_agreement(self) -> float | None:
        forced = [p for p in self.prompts if p.forced_compared is not None]
        compared = sum(p.forced_compared for p in forced)
        if not forced:
            return None
        return sum(p.forced_agreed for p in forced) / compared if compared else 1.0

    @property
    def judged_agreement(self) -> float:
        """What the threshold applies to: teacher-forced when measured, else free greedy."""
        forced = self.forced_agreement
        return self.agreement if forced is None else forced

    def summary(self) -> dict:
        n = len(self.prompts)
        return {
            "type": self.kind, "engine": self.engine, "passed": self.passed,
            "prompts": n,
            "same_prompt_ids": sum(p.same_prompt_ids for p in self.prompts),
            "greedy_agreement": round(self.agreement, 4),
            "teacher_forced_agreement": (None if self.forced_agreement is None
                                         else round(self.forced_agreement, 4)),
            "exact_first_tokens": sum(p.agreed_tokens == p.compared_tokens for p in self.prompts),
            "identical_answers": sum(p.identical for p in self.prompts),
            "parted_at_near_tie": sum(self._at_tie(p) for p in self.prompts),
            "stopped_by_itself": sum(p.export_stopped for p in self.prompts),
            "tokenizer_probes_mismatched": len(self.tokenizer_mismatches),
            "chat_template_probes_mismatched": len(self.chat_template_mismatches),
            "tokenizer_probes_after": self.tokenizer_probe_lead or None,
            "compared_tokens_per_answer": self.exact_tokens,
            "reference": self.reference,
        }

    def _at_tie(self, p: PromptResult) -> bool:
        return (p.agreed_tokens < p.compared_tokens and p.near_tie is not None
                and p.near_tie <= TIE_TOLERANCE.get(self.kind, 0.0))

    def diverged(self) -> list[PromptResult]:
        """Answers that part from the reference within the window, not at a near-tie."""
        return [p for p in self.prompts
                if p.agreed_tokens < p.compared_tokens and not self._at_tie(p)]

    def to_dict(self) -> dict:
        return {"summary": self.summary(), **asdict(self)}

    def lines(self) -> list[str]:
        s = self.summary()
        need = "exact" if self.exact_required else (
            f">= {self.min_agreement:.0%} " + ("teacher-forced agreement"
                                               if self.forced_agreement is not None
                                               else "agreement"))
        scope = f"on the first {self.exact_tokens} tokens" if self.exact_required or \
            self.forced_agreement is None else "over the trained answers"
        return [
            f"verification ({self.engine}, {self.kind}, {need} {scope}): "
            f"{'PASSED' if self.passed else 'FAILED'}",
            f"  prompt token ids identical: {s['same_prompt_ids']}/{s['prompts']}"
            + (f"; tokenizer probes mismatched: {s['tokenizer_probes_mismatched']}; chat "
               f"template probes mismatched: {s['chat_template_probes_mismatched']}"
               if self.engine == "llama.cpp" else ""),
            *([f"  tokenizer probes checked after {self.tokenizer_probe_lead!r}, where text sits "
               "in a prompt: this tokenizer puts '▁' before text only at the very start of the "
               "input, which llama.cpp cannot; the file adds none (tokenizer.ggml."
               "add_space_prefix=false), so all text after a control token (every chat prompt) "
               "tokenises as trained, and raw text opening a template-less prompt lacks its '▁'"]
              if self.tokenizer_probe_lead else []),
            *([f"  teacher-forced agreement: {s['teacher_forced_agreement']:.1%} of the trained "
               "answers' tokens"] if s["teacher_forced_agreement"] is not None else []),
            f"  greedy agreement: {s['greedy_agreement']:.1%} of tokens; first {self.exact_tokens}"
            f" tokens identical in {s['exact_first_tokens']}/{s['prompts']} answers"
            + (f" ({s['parted_at_near_tie']} more parted at a near-tie)"
               if s["parted_at_near_tie"] else "")
            + f"; whole answer identical in {s['identical_answers']}/{s['prompts']}",
            f"  stopped by itself: {s['stopped_by_itself']}/{s['prompts']}; compared with: "
            f"{self.reference}",
            *[f"  problem: {p}" for p in self.problems],
        ]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tie_margin(model, prompt: list[int], ref: list[int], got: list[int], k: int) -> float | None:
    """How close the reference model was to choosing the other side's token where they part:
    the logit margin as a share of the logits' spread (0 = a perfect tie)."""
    import torch

    if k >= len(ref) or k >= len(got):
        return None  # one answer ended (its stop token agreed up to there)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + ref[:k]])).logits[0, -1].float()
    spread = float(logits.max() - logits.min()) or 1.0
    return max(0.0, float(logits[ref[k]] - logits[got[k]])) / spread


def compare_answer(prompt: str, same_ids: bool, ref: list[int], exp: list[int], window: int,
                   decode: Callable[[list[int]], str], stopped: bool,
                   forced: list[int] | None = None) -> PromptResult:
    """`forced`: the export's teacher-forced choice for each token of `ref`, when measured."""
    compared = min(window, max(len(ref), len(exp)))
    agreed = min(_common_prefix(ref[:window], exp[:window]), compared)
    return PromptResult(prompt=prompt, same_prompt_ids=same_ids, reference=decode(ref),
                        export=decode(exp), reference_tokens=len(ref), export_tokens=len(exp),
                        agreed_tokens=agreed, compared_tokens=compared, identical=ref == exp,
                        export_stopped=stopped,
                        forced_agreed=None if forced is None else
                        sum(a == b for a, b in zip(ref, forced)),
                        forced_compared=None if forced is None else len(ref))


def judge(report: VerifyReport) -> VerifyReport:
    """Sets passed/problems from the per-prompt results."""
    problems = []
    if report.tokenizer_mismatches:
        problems.append(f"{report.engine} tokenises {len(report.tokenizer_mismatches)} probe "
                        f"text(s) differently, e.g. {report.tokenizer_mismatches[0]!r}")
    if report.chat_template_mismatches:
        problems.append(f"the file's own chat template gives other prompt ids than the trained "
                        f"model's for {len(report.chat_template_mismatches)} probe "
                        f"conversation(s): {report.chat_template_mismatches[0]}")
    bad_ids = [p.prompt for p in report.prompts if not p.same_prompt_ids]
    if bad_ids:
        problems.append(f"prompt token ids differ for {len(bad_ids)} prompt(s), e.g. "
                        f"{bad_ids[0][:80]!r}: the export would not see the trained prompt format")
    if report.exact_required:
        diverged = report.diverged()
        if diverged:
            p = diverged[0]
            problems.append(f"{len(diverged)} answer(s) differ within the first "
                            f"{report.exact_tokens} tokens, e.g. at token {p.agreed_tokens + 1}: "
                            f"trained {p.reference[:80]!r} vs export {p.export[:80]!r}")
    elif report.judged_agreement < report.min_agreement:
        what = "greedy" if report.forced_agreement is None else "teacher-forced"
        problems.append(f"{what} agreement {report.judged_agreement:.1%} is below the required "
                        f"{report.min_agreement:.0%} (lower it with --min-agreement, or use a "
                        "larger quantisation type)")
    report.problems, report.passed = problems, not problems
    return report


def golden_prompts(run_dir, limit: int) -> tuple[list[list[dict]], str]:
    """Up to `limit` prompts (conversations without their last answer) from the run's held-out
    split; from its training data when it held nothing out."""
    from afinar import rundir
    from afinar.config import load_train_config
    from afinar.data.prepare import split_for
    from afinar.data.validate import load_examples

    config = load_train_config(run_dir / rundir.CONFIG_FILE, anchor_paths=False)
    report = load_examples(config.data, config.format)
    if not report.ok:
        raise AfinarError(f"{config.data}: the run's training data no longer validates, so there "
                          "are no golden prompts to verify with", "pass --no-verify")
    train_ex, held_ex, how = split_for(config, report)
    pool, source = (held_ex, f"held-out part of {config.data} ({how})") if held_ex else \
        (train_ex, f"training data {config.data} (the run held nothing out)")
    prompts = [[{"role": m.role, "content": m.content} for m in ex.prompt_messages()]
               for ex in pool if ex.is_chat and ex.messages[-1].role == "assistant"]
    if not prompts:
        raise AfinarError("the run's data has no conversations to verify the export with",
                          "pass --no-verify")
    return prompts[:limit], source


def template_tokens(tokenizer) -> list[str]:
    """The family's special tokens: the added tokens its chat template writes, BOS and EOS."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    added = tokenizer.get_added_vocab()
    tokens = [t for t in added if t and t in template]
    tokens += [t for t in (tokenizer.bos_token, tokenizer.eos_token) if t and t not in tokens]
    return sorted(tokens, key=lambda t: (added.get(t, 0), t))


def tokenizer_probes(tokenizer) -> list[str]:
    """TOKENIZER_PROBES and the family's special tokens written as text: each alone, and all
    of them between words, as a chat prompt has them."""
    specials = template_tokens(tokenizer)
    mixed = "".join(f"{t}hola {t}\n" for t in specials)
    return [*TOKENIZER_PROBES, *specials, *([mixed] if mixed else [])]


def probe_lead(tokenizer) -> str:
    """"" (probes are checked alone), or for a tokenizer whose "▁" goes only at the start of
    the input (space_prefix.py) the control token a prompt opens with (BOS, else the first of
    the template's), so each probe is checked where text sits in a prompt: after one."""
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)  # None: no tokenizer.json form
    if backend is None or not space_prefix_only_at_start(json.loads(backend.to_str())):
        return ""
    return tokenizer.bos_token or (template_tokens(tokenizer) or [""])[0]


def first_difference(ours: list[int], theirs: list[int], decode) -> str:
    """Where two id lists part, in words: the position and each side's token there."""
    k = _common_prefix(ours, theirs)

    def at(ids: list[int]) -> str:
        return f"[{ids[k]}] {decode(ids[k:k + 1])!r}" if k < len(ids) else "the end"
    return f"from token {k + 1}: trained {at(ours)}, GGUF {at(theirs)}"


@dataclass
class LlamaChecks:
    """What llama.cpp is asked besides the answers (llama_child's `answer` task: "probes",
    "chats"), and the trained model's ids to compare its replies with."""
    probes: list[str]  # as tokenised, each after `lead`
    probe_ids: list[list[int]]
    chats: list[list[dict]]  # as the template is given them (afinar's renderable form)
    chat_ids: list[list[int]]
    decode: Callable[[list[int]], str]
    lead: str = ""  # probe_lead

    def task(self) -> dict:
        return {"probes": self.probes, "chats": self.chats}

    def mismatches(self, done: dict) -> tuple[list[str], list[str]]:
        """(tokenizer probes, chat descriptions) that differ; the child's `probes` and `chats`
        results (a chat that llama.cpp could not render is {"error": ...})."""
        texts = [text for text, ours, theirs in zip(self.probes, self.probe_ids, done["probes"])
                 if ours != theirs]
        chats = []
        for chat, ours, theirs in zip(self.chats, self.chat_ids, done.get("chats") or []):
            roles = "[" + ", ".join(m["role"] for m in chat) + "]"
            last = chat[-1]["content"]
            if isinstance(theirs, dict):
                chats.append(f"{roles} ending {last!r}: {theirs['error']}")
            elif ours != theirs:
                chats.append(f"{roles} ending {last!r}, "
                             + first_difference(ours, theirs, self.decode))
        if len(done.get("chats") or []) != len(self.chats):
            chats.append("llama.cpp rendered no chat probes (a child that predates the check)")
        return texts, chats


def llama_checks(loaded) -> LlamaChecks:
    """The checks for an afinar LoadedModel: its tokenizer on the probes, its encoder (the
    prompt format it was trained with) on CHAT_PROBES; a conversation the trained template
    itself cannot render (a refused role order) is left out."""
    tok = loaded.tokenizer
    lead = probe_lead(tok)
    probes = [lead + text for text in tokenizer_probes(tok)]
    chats, chat_ids = [], []
    for conversation in CHAT_PROBES:
        try:
            ids = loaded.prompt_ids(conversation)
        except AfinarError:
            continue
        chats.append(loaded.encoder.renderable(list(conversation)))
        chat_ids.append(ids)
    return LlamaChecks(probes, [tok(t, add_special_tokens=True)["input_ids"] for t in probes],
                       chats, chat_ids, lambda ids: tok.decode(ids), lead)
