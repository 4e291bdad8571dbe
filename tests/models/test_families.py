"""Every model family users bring, on a tiny random model built here (tests/families.py): the loss
mask of its chat template, then train → evaluate → chat → merged export through the library
functions the CLI calls, and the clear error for what a family cannot do (GGUF). Their tokenizers
and Ollama templates: test_family_tokenizers.py; their GGUF exports: test_family_gguf.py."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file

import afinar
from afinar import rundir
from afinar.config import TrainConfig
from afinar.data.example import Example, Message
from afinar.data.tokenize import IGNORE, ChatEncoder, TemplateError
from afinar.errors import AfinarError
from afinar.export import export
from afinar.infer.generate import GenerationSettings
from afinar.pipeline import fine_tune
from families import FAMILIES
from family_fixtures import _one_thread, family_dir  # noqa: F401 (fixtures)

NAMES = list(FAMILIES)
# What each template writes between the generation prompt and the answer's text.
ANSWER_LEAD = {"qwen3": "<think>\n\n</think>\n\n", "mistral": " "}
USER = {"role": "user", "content": "pedido 99 llegó roto"}


def _encoder(folder) -> ChatEncoder:
    """The encoder chat and training use for this model: its tokenizer and stop tokens."""
    return afinar.load(str(folder), notify=lambda message: None).encoder


def _segments(tokenizer, item) -> list[tuple[bool, str]]:
    """(labelled?, decoded text) for each run of positions with or without loss."""
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(item.input_ids, item.labels):
        trained = label != IGNORE
        if trained:
            assert label == token
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(token)
        else:
            runs.append((trained, [token]))
    return [(trained, tokenizer.decode(ids)) for trained, ids in runs]


def _chat(*turns: tuple[str, str], train_first: bool = True) -> Example:
    msgs, answers = [], 0
    for role, content in turns:
        weight = role == "assistant" and (train_first or answers > 0)
        answers += role == "assistant"
        msgs.append(Message(role, content, weight))
    return Example(tuple(msgs), path="f.jsonl", line=1)


# --- loss masks ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_only_answers_and_their_end_of_turn_carry_loss(name, family_dir):
    family = FAMILIES[name]
    enc = _encoder(family_dir(name))
    tok = enc.tokenizer
    eot = family.end_of_turn
    assert tok.convert_tokens_to_ids(eot) in enc.stop_ids
    lead = ANSWER_LEAD.get(name, "")

    item = enc.encode(_chat(("user", "pedido 1 llegó roto"), ("assistant", "Categoría: envío")))
    segments = _segments(tok, item)
    if family.spm and lead == " ":
        # SentencePiece: the space is the "▁" of the answer's first piece, labelled with it;
        # decoding a piece at the start of a text drops that space.
        first = item.labels[next(i for i, x in enumerate(item.labels) if x != IGNORE)]
        assert tok.convert_ids_to_tokens(first).startswith("▁")
        lead = ""
    assert [text for trained, text in segments if trained] == [f"{lead}Categoría: envío{eot}"]
    prompt = enc.prompt_ids([Message("user", "pedido 1 llegó roto")])
    assert item.input_ids[:len(prompt)] == prompt  # training prompt == inference prompt
    assert all(label == IGNORE for label in item.labels[:len(prompt)])
    # Exactly one BOS where the template writes one, although the tokenizer adds one too;
    # none where it does not (Phi-3 has a BOS token but neither adds nor writes it).
    writes_bos = "bos_token" in family.template
    if not family.bos_opens_turns:  # SmolLM2's BOS is <|im_start|>, in every turn
        assert item.input_ids.count(tok.bos_token_id) == int(writes_bos)
        assert (item.input_ids[0] == tok.bos_token_id) == writes_bos

    multi = (("user", "a"), ("assistant", "uno"), ("user", "b"), ("assistant", "dos"))
    if name == "qwen3":
        # Qwen3 writes an empty <think> block only into the last answer: earlier answers
        # render differently once the conversation goes on, so no mask fits both.
        with pytest.raises(TemplateError, match="prefix-stable") as caught:
            enc.encode(_chat(*multi))
        assert '"weight": 0' in caught.value.hint
        trained = _segments(tok, enc.encode(_chat(*multi, train_first=False)))
        assert [text for ok, text in trained if ok] == [f"{lead}dos{eot}"]
    else:
        trained = [text for ok, text in _segments(tok, enc.encode(_chat(*multi))) if ok]
        assert trained == [f"{lead}uno{eot}", f"{lead}dos{eot}"]


@pytest.mark.parametrize("name", NAMES)
def test_system_message(name, family_dir):
    family = FAMILIES[name]
    enc = _encoder(family_dir(name))
    example = _chat(("system", "Sé breve."), ("user", "hola"), ("assistant", "buenas"))
    if family.system == "last_user":
        # Mistral joins the system prompt to the last user turn and leaves it out of a
        # conversation that ends with an answer: no mask can match what inference sees.
        with pytest.raises(TemplateError, match="system message") as caught:
            enc.encode(example)
        assert "first user message" in caught.value.hint
        return
    segments = _segments(enc.tokenizer, enc.encode(example))
    prompt = "".join(text for trained, text in segments if not trained)
    assert [text for trained, text in segments if trained] == [
        f"{ANSWER_LEAD.get(name, '')}buenas{family.end_of_turn}"]
    if family.system in ("first_user", "refused"):
        # Gemma has no system role: the system text opens the first user turn (Gemma 3's
        # template does it; for Gemma 2, whose template refuses, afinar does it the same way).
        assert "<start_of_turn>user\nSé breve.\n\nhola<end_of_turn>" in prompt
        assert enc.merges_system == (family.system == "refused")
    else:
        assert "Sé breve." in prompt.split("hola")[0]


# --- train → eval → chat → export ----------------------------------------------------------
@contextmanager
def _steer(model, forced: list[int | None]):
    """Makes the model generate forced[k] as its k-th new token (None: its own choice), so
    stopping can be tested on models that never learn to stop in a few steps."""
    calls = {"n": 0}

    def hook(_module, _inputs, output):
        k = calls["n"]
        calls["n"] += 1
        if k < len(forced) and forced[k] is not None:
            output = output.clone()
            output[..., forced[k]] = output.abs().max() * 10 + 100
        return output

    handle = model.get_output_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_qwen3_answer_is_what_follows_the_think_block(family_dir):
    loaded = afinar.load(str(family_dir("qwen3")), notify=lambda message: None)
    tok = loaded.tokenizer
    think = tok("<think>\n\n</think>\n\n", add_special_tokens=False)["input_ids"]
    forced = think + [tok.convert_tokens_to_ids("<|im_end|>")]
    with _steer(loaded.model, forced):
        done = loaded.complete([[USER]], GenerationSettings(max_new_tokens=20))[0]
    assert (done.text, done.finish_reason) == ("", "stop")
    body = tok("Categoría: envío", add_special_tokens=False)["input_ids"]
    forced = think + body + [tok.convert_tokens_to_ids("<|im_end|>")]
    with _steer(loaded.model, forced):
        assert loaded.generate([[USER]], GenerationSettings(max_new_tokens=20)) == [
            "Categoría: envío"]
    with _steer(loaded.model, forced):
        assert "".join(loaded.stream([USER], GenerationSettings(max_new_tokens=20))) == (
            "Categoría: envío")


@pytest.mark.parametrize("name", NAMES)
def test_train_evaluate_chat_and_export(name, family_dir, small_chat_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    family = FAMILIES[name]
    base_dir = family_dir(name)
    result = fine_tune(TrainConfig(
        data=str(small_chat_file), model=str(base_dir), output=str(tmp_path / "run"), max_steps=8,
        batch_size=2, eval_steps=4, precision="fp32", learning_rate=1e-2, seed=0, evaluate=True))
    run = result.run_dir

    records = [json.loads(line) for line in (run / rundir.METRICS_FILE).read_text().splitlines()]
    losses = [r["train_loss"] for r in records if r["type"] == "train"]
    evals = [r["eval_loss"] for r in records if r["type"] == "eval"]
    assert len(losses) == 8
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2  # measured: about 6.4 -> 5.7
    assert min(evals[1:]) < evals[0] - 0.2  # evals[0] is the base model's held-out loss
    adapter = load_file(run / rundir.ADAPTER_DIR / "adapter_model.safetensors")
    lora_b = {k: t for k, t in adapter.items() if "lora_B" in k}
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b.values())  # B starts at zero
    report = json.loads((run / "report.json").read_text())
    assert result.report is not None and report["summary"]
    assert json.loads((run / rundir.RUN_FILE).read_text())["status"] == "succeeded"

    loaded = afinar.load(str(run), notify=lambda message: None)
    eot = loaded.tokenizer.convert_tokens_to_ids(family.end_of_turn)
    assert eot in loaded.stop_ids
    answer = loaded.generate([[USER]], GenerationSettings(max_new_tokens=8))
    assert isinstance(answer, list) and isinstance(answer[0], str)
    with _steer(loaded.model, [None, None, None, eot]):
        done = loaded.complete([[USER]], GenerationSettings(max_new_tokens=20))[0]
    assert (done.finish_reason, done.completion_tokens) == ("stop", 4)
    assert family.end_of_turn not in done.text

    exported = export(str(run), to="merged", output=str(tmp_path / "merged"), prompts=2,
                      max_new_tokens=12, exact_tokens=12, notify=lambda message: None)
    assert exported.verification.passed
    # The merged folder alone, in plain transformers: same prompt ids, same logits, and its
    # generation config stops at the family's end-of-turn token.
    merged = AutoModelForCausalLM.from_pretrained(exported.output, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported.output)
    ids = tokenizer.apply_chat_template([USER], add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert ids == loaded.prompt_ids([USER])
    with torch.no_grad():
        theirs = merged(torch.tensor([ids])).logits
        ours = loaded.model(torch.tensor([ids])).logits
    assert torch.allclose(theirs, ours, atol=1e-5)
    with _steer(merged, [None, None, eot]), torch.no_grad():
        out = merged.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=20)
    assert out[0, len(ids):].tolist()[-1] == eot and out.shape[1] == len(ids) + 3

    # LoRA changed exactly the linear layers (Phi-3's fused qkv_proj and gate_up_proj too).
    base = load_file(base_dir / "model.safetensors")
    tuned = load_file(exported.output / "model.safetensors")
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    linears = {k for k in base if k.endswith("_proj.weight")}
    assert changed == linears
    if name == "phi3":
        assert any("qkv_proj" in k for k in changed) and any("gate_up_proj" in k for k in changed)

    # GGUF and Ollama go through llama.cpp's converter (issue 24): a tiny model it cannot take
    # yet (a tokenizer it does not accept, a window llama.cpp would not apply, a TEMPLATE Ollama
    # cannot express) is refused clearly, pointing to --to merged, and leaves nothing behind.
    for to in ("gguf", "ollama"):
        try:
            export(str(run), to=to, output=str(tmp_path / to), verify=False,
                   notify=lambda message: None)
        except AfinarError as caught:
            assert "--to merged" in str(caught) or "TEMPLATE" in str(caught), str(caught)
            assert not (tmp_path / to).exists()


def test_gemma2_system_prompt_joins_the_first_user_turn_everywhere(family_dir, tmp_path):
    """Gemma 2's template refuses a system role; data, chat and the verified export all join it
    to the first user message instead, the way Gemma 3's template does."""
    from conftest import write_jsonl

    records = [{"messages": [
        {"role": "system", "content": "Responde con el formato de triaje."},
        {"role": "user", "content": f"pedido {i} llegó roto"},
        {"role": "assistant", "content": f"Categoría: envío\nRespuesta: {i}"},
    ]} for i in range(10)]
    data = write_jsonl(tmp_path / "system.jsonl", records)
    events = []
    result = fine_tune(TrainConfig(data=str(data), model=str(family_dir("gemma2")),
                               output=str(tmp_path / "run"), max_steps=2, batch_size=2,
                               precision="fp32", evaluate=False), on_event=events.append)
    warnings = [e["message"] for e in events if e.get("level") == "warning"]
    assert any("no system role" in w for w in warnings), warnings

    loaded = afinar.load(str(result.run_dir), notify=lambda message: None)
    conversation = [records[0]["messages"][0], USER]
    text = loaded.tokenizer.decode(loaded.prompt_ids(conversation))
    assert text.startswith("<bos><start_of_turn>user\nResponde con el formato de triaje.\n\n"
                           "pedido 99 llegó roto<end_of_turn>\n<start_of_turn>model\n")
    assert isinstance(loaded.generate([conversation], GenerationSettings(max_new_tokens=4))[0],
                      str)
    exported = export(str(result.run_dir), to="merged", output=str(tmp_path / "merged"),
                      prompts=2, max_new_tokens=8, exact_tokens=8, notify=lambda message: None)
    summary = exported.verification.summary()
    assert summary["passed"] and summary["same_prompt_ids"] == 2
