"""`merged`: the LoRA folded into the base weights, as a standard Hugging Face folder that plain
`transformers` loads: safetensors, config, the tokenizer with the chat template the run trained
with, and a generation config whose EOS ids are every token that ends a turn (so `generate()`
stops where afinar's own inference stops). afinar.json records the run it came from (and, for a
QLoRA run, that the adapter is merged into the de-quantised base weights).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from afinar.errors import AfinarError

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


METADATA_FILE = "afinar.json"


def write_merged(loaded, folder: Path, kind: str, metadata: dict | None = None) -> None:
    """`loaded` is an afinar LoadedModel of the run (adapter already merged); `metadata` goes
    to afinar.json."""
    write_hf_folder(loaded.model, loaded.tokenizer, loaded.stop_ids, folder, kind, metadata)


def write_hf_folder(model, tokenizer, stop_ids: list[int], folder: Path, kind: str,
                    metadata: dict | None = None) -> None:
    """`model` saved with `tokenizer` as a Hugging Face folder whose generation config stops at
    every id in `stop_ids`; the in-memory model keeps its dtype."""
    if kind not in DTYPES:
        raise AfinarError(f"merged weights are saved as f32, f16 or bf16, not {kind!r}",
                          "for quantised files use --to gguf --quant ...")
    gen = model.generation_config
    gen.eos_token_id = stop_ids if len(stop_ids) > 1 else stop_ids[0]
    gen.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    # Cast a copy: the in-memory model stays fp32, it is the verification's reference.
    # Tied tensors (embeddings = output) stay one tensor, so save_pretrained still dedups them.
    # (An f32 save of an fp32 model makes no copy: `.to` returns the tensor itself.)
    cast: dict[int, torch.Tensor] = {}
    state = {}
    for key, tensor in model.state_dict().items():
        if tensor.data_ptr() not in cast:
            cast[tensor.data_ptr()] = tensor.to(DTYPES[kind])
        state[key] = cast[tensor.data_ptr()]
    model.save_pretrained(folder, state_dict=state)
    # save_pretrained records the in-memory dtype; loaders read this to pick the weights' type.
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["dtype"] = str(DTYPES[kind]).removeprefix("torch.")
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(folder)
    if metadata:
        (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2, ensure_ascii=False)
                                            + "\n", encoding="utf-8")


def converter_folder(model, tokenizer, stop_ids: list[int], folder: Path, resolved) -> Path:
    """The model as a Hugging Face folder in f32, for llama.cpp's converter: f32 so that every
    GGUF type is rounded once, from the trained values, and so that no cast copy of the weights
    is made in memory. A SentencePiece `tokenizer.model` the fast tokenizer does not save is
    copied from where the tokenizer came from (the converter reads it for those families)."""
    write_hf_folder(model, tokenizer, stop_ids, folder, "f32")
    # transformers 5 no longer writes add_bos_token / add_eos_token; without them (and without a
    # post-processor saying so) llama.cpp takes its per-tokenizer default, on for SentencePiece.
    # Say what this tokenizer does.
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config.setdefault("add_bos_token", adds_special(tokenizer, tokenizer.bos_token_id))
    config.setdefault("add_eos_token", adds_special(tokenizer, tokenizer.eos_token_id))
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    spm = "tokenizer.model"
    if not (folder / spm).is_file():
        vocab_file = getattr(tokenizer, "vocab_file", None)
        candidates = [Path(vocab_file)] if vocab_file else []
        candidates += [Path(resolved.tokenizer_source) / spm, Path(resolved.base) / spm]
        for candidate in candidates:
            if candidate.name == spm and candidate.is_file():
                shutil.copyfile(candidate, folder / spm)
                break
    return folder


def adds_special(tokenizer, token_id: int | None) -> bool:
    """Does encoding plain text (with special tokens on) put this token in? (BOS/EOS flags)."""
    if token_id is None:
        return False
    return token_id in tokenizer("a", add_special_tokens=True)["input_ids"] \
        and token_id not in tokenizer("a", add_special_tokens=False)["input_ids"]


class MergedRunner:
    """The export seen by a user of plain transformers: only the folder, nothing of afinar."""

    def __init__(self, folder: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        eos = self.model.generation_config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos])

    def prompt_ids(self, conversation: list[dict]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                                 tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    @torch.inference_mode()
    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        # Only the folder's generation config decides when to stop: that is what is verified.
        out = self.model.generate(torch.tensor([prompt_ids]), do_sample=False,
                                  max_new_tokens=max_new_tokens)
        return cut_at_stop(out[0, len(prompt_ids):].tolist(), self.stop_ids)


def cut_at_stop(ids: list[int], stop_ids) -> list[int]:
    for k, token in enumerate(ids):
        if token in stop_ids:
            return ids[:k + 1]
    return ids
