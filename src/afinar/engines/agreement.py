"""Do the two engines give the same greedy answers? The rule GGUF export verification uses: the
token ids are the same, or they part only where the transformers model itself was at a near-tie
between the two tokens (its logit margin within export.verify.TIE_TOLERANCE of its spread for
the GGUF's type), or one side ended where the other went on after an agreed stop.

    result = compare_engines(loaded, llama_model, conversations, max_new_tokens=48)
    result.summary()   # {"prompts": 8, "identical": 7, "parted_at_near_tie": 1, "parted": 0}
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from afinar.export.verify import TIE_TOLERANCE, tie_margin


@dataclass
class Parting:
    prompt: str
    at_token: int
    margin: float | None  # the transformers model's margin there (None: one side had ended)
    transformers: str
    llama_cpp: str


@dataclass
class EngineAgreement:
    kind: str
    prompts: int = 0
    identical: int = 0
    partings: list[Parting] = field(default_factory=list)

    def near_tie(self, parting: Parting) -> bool:
        return parting.margin is None or parting.margin <= TIE_TOLERANCE.get(self.kind, 0.0)

    def summary(self) -> dict:
        ties = sum(self.near_tie(p) for p in self.partings)
        return {"prompts": self.prompts, "identical": self.identical, "parted_at_near_tie": ties,
                "parted": len(self.partings) - ties, "gguf_type": self.kind}

    @property
    def passed(self) -> bool:
        return self.summary()["parted"] == 0


def _cut(ids: list[int], stop_ids) -> list[int]:
    end = next((k for k, t in enumerate(ids) if t in stop_ids), None)
    return ids if end is None else ids[:end + 1]


@torch.inference_mode()
def _transformers_ids(loaded, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = loaded.model.generate(torch.tensor([prompt], device=loaded.device),
                                attention_mask=torch.ones((1, len(prompt)), dtype=torch.long,
                                                          device=loaded.device),
                                do_sample=False, max_new_tokens=max_new_tokens,
                                eos_token_id=loaded.stop_ids,
                                pad_token_id=loaded.tokenizer.pad_token_id)
    return _cut(out[0, len(prompt):].tolist(), loaded.stop_ids)


def compare_engines(loaded, llama, conversations: list, max_new_tokens: int = 48
                    ) -> EngineAgreement:
    """`loaded`: the transformers LoadedModel; `llama`: a LlamaCppModel of the same model."""
    result = EngineAgreement(kind=llama.files.model.stem.rsplit("-", 1)[-1])
    for conversation in conversations:
        prompt = loaded.prompt_ids(conversation)
        assert prompt == llama.prompt_ids(conversation), "both engines get afinar's prompt ids"
        ref = _transformers_ids(loaded, prompt, max_new_tokens)
        got = _cut(llama.server.complete(prompt, max_new_tokens, llama.lora)["tokens"],
                   loaded.stop_ids)
        result.prompts += 1
        if ref == got:
            result.identical += 1
            continue
        k = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
        decode = loaded.tokenizer.decode
        result.partings.append(Parting(conversation[-1]["content"], k,
                                       tie_margin(loaded.model, prompt, ref, got, k),
                                       decode(ref), decode(got)))
    return result
