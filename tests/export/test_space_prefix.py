"""Which tokenizers get tokenizer.ggml.add_space_prefix=false in their GGUF, and where their
probes are checked (afinar/export/space_prefix.py, verify.probe_lead). The end-to-end proof that
such a file gives the trained prompt ids is tests/models/test_family_gguf.py (Mistral v0.3,
Phi-3)."""

from __future__ import annotations

import json

from family_tokenizers import GEMMA_SPM, MISTRAL_SPM, PHI3_SPM, sentencepiece_tokenizer

from afinar.export.space_prefix import ADD_SPACE_PREFIX_KEY, gguf_overrides
from afinar.export.verify import probe_lead

METASPACE = {"type": "Metaspace", "replacement": "▁", "split": False}


def test_only_a_metaspace_that_prefixes_the_first_piece_turns_the_prefix_off():
    first = {"pre_tokenizer": {**METASPACE, "prepend_scheme": "first"}}
    assert gguf_overrides(first) == {ADD_SPACE_PREFIX_KEY: False}
    inside = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {**METASPACE, "prepend_scheme": "first"}]}}
    assert gguf_overrides(inside) == {ADD_SPACE_PREFIX_KEY: False}
    # llama.cpp's own rules already match these: its default for "always", Gemma's "never"
    # (its converter writes the prefix off), and byte-level BPE has no prefix at all.
    for scheme in ("always", "never"):
        assert gguf_overrides({"pre_tokenizer": {**METASPACE, "prepend_scheme": scheme}}) == {}
    assert gguf_overrides({"pre_tokenizer": {"type": "ByteLevel"}}) == {}
    assert gguf_overrides({"pre_tokenizer": None}) == {}


def test_probes_go_after_bos_for_those_tokenizers_only(tmp_path):
    for spec, eos, lead in ((MISTRAL_SPM, "</s>", "<s>"), (PHI3_SPM, "<|end|>", "<s>"),
                            (GEMMA_SPM, "<end_of_turn>", "")):
        tok = sentencepiece_tokenizer(spec, tmp_path / spec.tokenizer_class / eos[1:4],
                                      "{{ messages }}", eos, None)
        declared = json.loads(tok.backend_tokenizer.to_str())
        assert probe_lead(tok) == lead, spec
        assert bool(gguf_overrides(declared)) == bool(lead), spec
