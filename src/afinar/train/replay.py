"""`preserve`: a replay set of the base model's own answers, mixed into training.

    replay = build_replay(config, encoder, train_examples, task_items, notify=print)
    replay.for_epoch(epoch)   # indices into replay.items trained on in that epoch

A dataset where every prompt carries the taught format teaches "always answer this way". Mixing
in a few of the base model's own answers to unrelated prompts (data/preserve/prompts.jsonl,
Spanish and English, a different set from the evaluation's probes so the evaluation stays
honest) teaches where the format does not belong. The prompts are asked with no system prompt,
under other assistants' system prompts, and (preserve_data_system) under the data's own system
prompt(s): a general question under the task's system prompt keeps an ordinary answer.

The answers are greedy, so they are generated once per base model and cached (the evaluation's
answer cache, keyed by weights, tokenizer and settings). Each replay example weighs as much as an
average task example: its first 8 answer tokens, where an answer takes its format, weigh 1, the
rest less (so long base answers do not drown the task). Each epoch trains on `preserve_ratio` x
the training examples of them, rotating through the set.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from afinar.data.example import Example, Message
from afinar.data.stats import system_prompts_by_use
from afinar.data.tokenize import IGNORE, ChatEncoder, TemplateError, Tokenized

PRESERVE_DIR = Path(__file__).resolve().parent.parent / "data" / "preserve"
PROMPTS_FILE = PRESERVE_DIR / "prompts.jsonl"
SYSTEMS_FILE = PRESERVE_DIR / "system_prompts.json"
MAX_NEW_TOKENS = 64  # the start of an answer is where a format shows; keeps replay cheap
MAX_DATA_SYSTEMS = 4
MAX_TASK_PROMPTS = 24
FULL_WEIGHT_TOKENS = 8
MIN_WEIGHT = 0.05


@dataclass
class ReplaySet:
    examples: list[Example]
    items: list[Tokenized]
    per_epoch: int
    seed: int
    info: dict = field(default_factory=dict)

    def for_epoch(self, epoch: int) -> list[int]:
        """Every "task" example (the data's own prompts under other system prompts: what ties
        the format to its system prompt), then `per_epoch` of the general ones, rotating
        through a seeded order so every one comes up."""
        always = [i for i, ex in enumerate(self.examples) if ex.extra["replay"] == "task"]
        general = [i for i, ex in enumerate(self.examples) if ex.extra["replay"] != "task"]
        n = len(general)
        if not n or not self.per_epoch:
            return always
        random.Random(self.seed * 7919 + 17).shuffle(general)
        start = (epoch * self.per_epoch) % n
        return always + [general[(start + k) % n] for k in range(min(self.per_epoch, n))]


def load_prompts() -> list[dict]:
    lines = PROMPTS_FILE.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def other_system_prompts() -> list[str]:
    return list(json.loads(SYSTEMS_FILE.read_text(encoding="utf-8")))


def replay_conversations(data_systems: list[str], with_data_system: bool,
                         task_examples: list[Example] = (), task_share: float = 0.0
                         ) -> list[tuple[str, list]]:
    """(variant, messages): each bundled prompt with no system prompt / another assistant's /
    the data's; then `task_share` of the data's own prompts that have a system prompt, asked
    under another assistant's system prompt or none ("task")."""
    variants = ["none", "other"] + (["data"] if with_data_system and data_systems else [])
    others = other_system_prompts()
    out = []
    used = {v: 0 for v in variants}
    for i, prompt in enumerate(load_prompts()):
        # Pairs of prompts share a variant: the prompts alternate Spanish and English, so each
        # language gets every variant.
        variant = variants[(i // 2) % len(variants)]
        turn, used[variant] = used[variant], used[variant] + 1
        system = {"none": None, "other": others[turn % len(others)],
                  "data": data_systems[:MAX_DATA_SYSTEMS][turn % min(
                      MAX_DATA_SYSTEMS, len(data_systems))] if data_systems else None}[variant]
        messages = ([{"role": "system", "content": system}] if system else []) + prompt["messages"]
        out.append((variant, messages))
    with_system = [ex for ex in task_examples if ex.is_chat and ex.system_prompt is not None]
    n_task = min(MAX_TASK_PROMPTS, math.ceil(task_share * len(with_system)))
    step = len(with_system) / n_task if n_task else 1
    for k in range(n_task):
        ex = with_system[int(k * step)]
        rest = [{"role": m.role, "content": m.content} for m in ex.prompt_messages()
                if m.role != "system"]
        system = others[k % len(others)] if k % 3 else None
        out.append(("task", ([{"role": "system", "content": system}] if system else []) + rest))
    return out


class _CacheKey:
    """What the answer cache needs of a model (prompt ids, fingerprint parts) without loading
    its weights: a cache hit costs a tokenizer, not a model."""

    def __init__(self, resolved, encoder: ChatEncoder, device, signature=None):
        self.resolved, self.encoder, self.device = resolved, encoder, device
        self.stop_ids = sorted(encoder.stop_ids)
        self.signature = signature  # the engine's (afinar.engines.BaseAnswerer); None: transformers

    def prompt_ids(self, conversation) -> list[int]:
        return self.encoder.prompt_ids([Message(m["role"], m["content"]) for m in conversation])

    def engine_signature(self) -> list[str]:
        from afinar.infer.generate import transformers_signature

        return list(self.signature) if self.signature else transformers_signature(self.device)


def _without_end_of_turn(item: Tokenized, stop_ids: set[int]) -> Tokenized:
    """An answer cut at the token budget must not teach stopping there: its end-of-turn (and
    what the template adds after it) is dropped."""
    last = max(i for i, label in enumerate(item.labels) if label != IGNORE)
    cut = last
    while cut > 0 and item.input_ids[cut] in stop_ids:
        cut -= 1
    return replace(item, input_ids=item.input_ids[:cut + 1], labels=item.labels[:cut + 1])


def _trains_with_system(encoder: ChatEncoder) -> bool:
    probe = Example((Message("system", "s"), Message("user", "u"),
                     Message("assistant", "a", train=True)))
    try:
        encoder.encode(probe)
    except TemplateError:
        return False
    return True


def build_replay(config, resolved, encoder: ChatEncoder, train_examples: list[Example],
                 task_items: list[Tokenized], device, notify: Callable[[str], None] = print,
                 on_progress: Callable[[int, int], None] | None = None,
                 answerer=None) -> ReplaySet:
    """`answerer`: the engine the base model answers with (afinar.engines.BaseAnswerer: its
    `signature` keys the cache, `open()` starts it); None: transformers in this process."""
    from afinar.infer.answer_cache import AnswerCache
    from afinar.infer.generate import GenerationSettings

    started = time.perf_counter()
    systems = system_prompts_by_use(train_examples)
    conversations = replay_conversations(systems, config.preserve_data_system, train_examples,
                                         config.preserve_task_prompts)
    if not _trains_with_system(encoder):
        # Mistral-style templates move the system message to the last user turn: no stable
        # loss mask with one, so only the replay prompts without a system message are kept.
        conversations = [(v, m) for v, m in conversations if m[0]["role"] != "system"]
    prompts = [messages for _, messages in conversations]
    settings = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS)
    cache = AnswerCache(_CacheKey(resolved, encoder, device,
                                  answerer.signature if answerer else None), settings)
    answers = cache.lookup(prompts)
    todo = [i for i, a in enumerate(answers) if a is None]
    if todo:
        from afinar.infer.generate import load, running_count

        notify(f"preserve: the base model answers {len(todo)} general prompts once (cached "
               "for later runs of this base model)")
        model = (answerer.open(notify) if answerer else
                 load(config.model, device=str(device), notify=notify))
        progress = (running_count(lambda done: on_progress(done, len(todo)))
                    if on_progress else None)
        try:
            new = model.generate([prompts[i] for i in todo], settings, batch_size=16,
                                 on_progress=progress)
        finally:
            model.close()
        del model
        for i, answer in zip(todo, new):
            answers[i] = answer
        cache.store([prompts[i] for i in todo], new)

    examples, items = [], []
    target = sum(t.n_supervised for t in task_items) / max(1, len(task_items))
    tokenizer = encoder.tokenizer
    for (variant, messages), answer in zip(conversations, answers):
        if not answer or not answer.strip():
            continue
        ex = Example(tuple(Message(m["role"], m["content"]) for m in messages)
                     + (Message("assistant", answer, train=True),),
                     path=str(PROMPTS_FILE), line=len(examples) + 1, extra={"replay": variant})
        item = encoder.encode(ex, len(items))
        if len(tokenizer(answer, add_special_tokens=False)["input_ids"]) >= MAX_NEW_TOKENS - 1:
            item = _without_end_of_turn(item, encoder.stop_ids)
        if item.n_supervised == 0 or len(item.input_ids) > config.max_seq_length:
            continue
        # One replay example weighs as much as an average task example, and its first tokens,
        # where an answer takes its format, weigh as much as a task answer's.
        head = min(FULL_WEIGHT_TOKENS, item.n_supervised)
        rest = item.n_supervised - head
        weight = 1.0 if not rest else min(1.0, max(MIN_WEIGHT, (target - head) / rest))
        item = replace(item, weight=weight, full_weight_tokens=head)
        examples.append(ex)
        items.append(item)
    general = sum(ex.extra["replay"] != "task" for ex in examples)
    per_epoch = min(general, max(1, math.ceil(config.preserve_ratio * len(task_items))))
    variants: dict[str, int] = {}
    for ex in examples:
        variants[ex.extra["replay"]] = variants.get(ex.extra["replay"], 0) + 1
    per_epoch_total = per_epoch + variants.get("task", 0)
    info = {"examples": len(items), "per_epoch": per_epoch_total,
            "variants": variants,
            "data_system_prompts": min(len(systems), MAX_DATA_SYSTEMS)
            if config.preserve_data_system else 0,
            "tokens": sum(len(t.input_ids) for t in items),
            "tokens_per_epoch": round(sum(len(t.input_ids) for t in items) / max(1, len(items))
                                      * per_epoch_total),
            "task_tokens_per_epoch": sum(len(t.input_ids) for t in task_items),
            "mean_weight": round(sum(t.weight for t in items) / max(1, len(items)), 3),
            "full_weight_tokens": FULL_WEIGHT_TOKENS,
            "generated": len(todo), "from_cache": len(prompts) - len(todo),
            "seconds": round(time.perf_counter() - started, 2),
            "cache_file": str(cache.file) if cache.file else None}
    return ReplaySet(examples, items, per_epoch, config.seed, info)


def describe(info: dict) -> str:
    share = info["tokens_per_epoch"] / max(1, info["task_tokens_per_epoch"])
    return (f"preserve: {info['per_epoch']} of {info['examples']} replay examples per epoch "
            f"(the base model's own answers to general prompts; +{share:.0%} tokens), "
            f"{'generated now' if info['generated'] else 'from the cache'}")
