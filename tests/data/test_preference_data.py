"""Preference pairs: the three spellings, every validation error, masks and length handling."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from afinar.config import TrainConfig
from afinar.data.pairs import encode_pair, fit_pair, length_bias_warning, pair_stats
from afinar.data.prepare import prepare_data
from afinar.data.tokenize import IGNORE, ChatEncoder
from afinar.data.validate import load_examples
from afinar.errors import DataError
from conftest import write_jsonl

SYSTEM = {"role": "system", "content": "Responde breve."}
USER = {"role": "user", "content": "¿Abrís el sábado?"}
GOOD = "Respuesta: sí, de 10:00 a 14:00."
BAD = "¡Hola! Pues mira, el sábado abrimos por la mañana, de diez a dos."


def _assistant(text):
    return [{"role": "assistant", "content": text}]


SPELLINGS = {
    "dpo": {"input": {"messages": [SYSTEM, USER]}, "preferred_output": _assistant(GOOD),
            "non_preferred_output": _assistant(BAD)},
    "preference": {"prompt": [SYSTEM, USER], "chosen": GOOD, "rejected": BAD},
    "implicit": {"chosen": [SYSTEM, USER, *_assistant(GOOD)],
                 "rejected": [SYSTEM, USER, *_assistant(BAD)]},
}


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_every_spelling_reads_into_the_same_pair(tmp_path, spelling):
    path = write_jsonl(tmp_path / "p.jsonl", [SPELLINGS[spelling]] * 12)
    report = load_examples(path)
    assert report.ok, [str(i) for i in report.errors]
    assert report.format == ("dpo" if spelling == "dpo" else "preference")
    ex = report.examples[0]
    assert [(m.role, m.content) for m in ex.prompt_messages()] == [
        ("system", "Responde breve."), ("user", USER["content"])]
    assert ex.final_answer() == GOOD and ex.rejected == BAD
    assert [m.train for m in ex.messages] == [False, False, True]


def _openai(**change):
    record = {"input": {"messages": [USER]}, "preferred_output": _assistant(GOOD),
              "non_preferred_output": _assistant(BAD)}
    record.update(change)
    return record


ERRORS = [
    ("chosen equal to rejected", _openai(non_preferred_output=_assistant(GOOD)),
     "non_preferred_output", "same as the preferred answer"),
    ("equal, prompt form", {"prompt": "hola", "chosen": "x", "rejected": " x "}, "rejected",
     "same as the preferred answer"),
    ("equal, implicit form", {"chosen": [USER, *_assistant(GOOD)],
                              "rejected": [USER, *_assistant(GOOD)]}, "rejected",
     "same conversation"),
    ("empty answer", _openai(preferred_output=_assistant("  ")), "preferred_output[0].content",
     "is empty"),
    ("empty string answer", {"prompt": "hola", "chosen": "", "rejected": "x"}, "chosen",
     "is empty"),
    ("string answer, OpenAI form", _openai(preferred_output=GOOD), "preferred_output",
     "must be a list holding one assistant message, got a string"),
    ("string rejected answer, OpenAI form", _openai(non_preferred_output=BAD),
     "non_preferred_output", "must be a list holding one assistant message, got a string"),
    ("missing answer, OpenAI form", {"input": {"messages": [USER]},
                                     "non_preferred_output": _assistant(BAD)},
     "preferred_output", "is missing"),
    ("two output messages", _openai(preferred_output=_assistant(GOOD) * 2), "preferred_output",
     "one final assistant message, got 2"),
    ("output from the user", _openai(non_preferred_output=[{"role": "user", "content": "x"}]),
     "non_preferred_output[0].role", "must be assistant"),
    ("prompt ends with an assistant turn",
     _openai(input={"messages": [USER, *_assistant("antes")]}), "input.messages[1]",
     "ends with an assistant turn"),
    ("tool calls in the answer", _openai(preferred_output=[
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]),
     "preferred_output[0]", "tool calls are not supported"),
    ("tool definitions", _openai(input={"messages": [USER], "tools": [{"type": "function"}]}),
     "input.tools", "tool definitions are not supported"),
    ("prompts differ, implicit form", {"chosen": [USER, *_assistant(GOOD)],
                                       "rejected": [{"role": "user", "content": "otra"},
                                                    *_assistant(BAD)]},
     "chosen[0]", "differ before their last assistant message"),
    ("implicit form with strings", {"chosen": GOOD, "rejected": BAD}, "chosen",
     "must be whole conversations"),
    ("missing input", {"preferred_output": _assistant(GOOD),
                       "non_preferred_output": _assistant(BAD)}, "input",
     "must be an object with messages"),
]


@pytest.mark.parametrize("record,field,message", [e[1:] for e in ERRORS],
                         ids=[e[0] for e in ERRORS])
def test_every_problem_is_located_by_line_and_field(tmp_path, record, field, message):
    good = SPELLINGS["dpo"] if "input" in record or "preferred_output" in record else (
        SPELLINGS["implicit"] if "prompt" not in record else SPELLINGS["preference"])
    path = write_jsonl(tmp_path / "p.jsonl", [good] * 11 + [record])
    report = load_examples(path)
    errors = [str(i) for i in report.errors]
    assert any(e.startswith(f"{path}:12: {field}: ") and message in e for e in errors), errors
    assert len(report.examples) == 11  # the bad line is left out, the others kept


def test_openai_outputs_must_be_one_assistant_message_as_openai_checks_them(tmp_path):
    """OpenAI's API rejects a DPO line whose outputs are not [one assistant message]; a file
    that passes `afinar validate` must pass there too. Every such error names the fix."""
    wrong = [_openai(preferred_output=GOOD), _openai(non_preferred_output=BAD),
             _openai(preferred_output=_assistant(GOOD) + _assistant(BAD)),
             _openai(non_preferred_output=[{"role": "system", "content": BAD}]),
             _openai(preferred_output={"role": "assistant", "content": GOOD})]
    path = write_jsonl(tmp_path / "p.jsonl", [SPELLINGS["dpo"]] * 11 + wrong)
    report = load_examples(path)
    assert sorted({i.line for i in report.errors}) == [12, 13, 14, 15, 16]
    fix = 'write [{"role": "assistant", "content": "..."}]'
    assert all(fix in i.hint for i in report.errors), [str(i) for i in report.errors]
    assert len(report.examples) == 11


def test_prompt_chosen_rejected_keeps_accepting_strings(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": f"pregunta {i}", "chosen": GOOD, "rejected": BAD} for i in range(12)])
    report = load_examples(path)
    assert report.ok and report.format == "preference", [str(i) for i in report.errors]
    assert report.examples[0].final_answer() == GOOD and report.examples[0].rejected == BAD


def test_afinar_validate_refuses_a_string_output_with_the_line_and_the_fix(tmp_path):
    """Through the installed console script, as a user runs it."""
    path = write_jsonl(tmp_path / "p.jsonl", [SPELLINGS["dpo"]] * 11
                       + [_openai(preferred_output=GOOD)])
    afinar = Path(sys.executable).parent / "afinar"
    proc = subprocess.run([str(afinar), "validate", str(path), "--no-tokens"],
                          capture_output=True, text=True, timeout=120)
    output = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)
    assert proc.returncode == 1, output
    assert (f"{path}:12: preferred_output: must be a list holding one assistant message, got a "
            "string") in " ".join(output.split())
    assert 'write [{"role": "assistant", "content": "..."}]' in output
    assert "Traceback" not in output


def _pairs(tmp_path, n=12, chosen=GOOD, rejected=BAD):
    return write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": [SYSTEM, {"role": "user", "content": f"pregunta {i}"}],
         "chosen": chosen, "rejected": rejected} for i in range(n)])


def _encoder(tokenizer):
    return ChatEncoder(tokenizer, [tokenizer.eos_token_id])


def test_both_sides_share_the_prompt_and_train_only_their_answer(tmp_path, tiny_tokenizer):
    ex = load_examples(_pairs(tmp_path)).examples[0]
    pair = encode_pair(_encoder(tiny_tokenizer), ex)
    for side, text in ((pair.chosen, GOOD), (pair.rejected, BAD)):
        assert side.input_ids[:pair.prompt_tokens] == pair.chosen.input_ids[:pair.prompt_tokens]
        assert all(x == IGNORE for x in side.labels[:pair.prompt_tokens])
        trained = [t for t in side.labels if t != IGNORE]
        assert trained[-1] == tiny_tokenizer.eos_token_id  # the end-of-turn token is learned
        assert tiny_tokenizer.decode(trained[:-1]) == text


def test_max_seq_length_cuts_the_prompt_from_the_left_never_the_answers(tmp_path,
                                                                          tiny_tokenizer):
    ex = load_examples(_pairs(tmp_path)).examples[0]
    pair = encode_pair(_encoder(tiny_tokenizer), ex)
    limit = pair.length - 3
    cut = fit_pair(pair, limit, "truncate")
    assert cut.truncated and cut.length == limit and cut.prompt_tokens == pair.prompt_tokens - 3
    assert cut.chosen.input_ids == pair.chosen.input_ids[3:]
    assert cut.rejected.labels[cut.prompt_tokens:] == pair.rejected.labels[pair.prompt_tokens:]
    assert fit_pair(pair, limit, "drop") is None
    answers_only = max(pair.chosen.n_supervised, pair.rejected.n_supervised)
    assert fit_pair(pair, answers_only, "truncate") is None  # the answers alone do not fit


def test_the_report_warns_when_one_side_is_systematically_longer(tmp_path, tiny_tokenizer):
    encoder = _encoder(tiny_tokenizer)
    biased = [encode_pair(encoder, ex) for ex in load_examples(_pairs(tmp_path)).examples]
    stats = pair_stats(biased, 1024, "truncate")
    assert stats["chosen_shorter_share"] == 1.0
    assert "rejected answer is longer in 100% of the pairs" in length_bias_warning(stats)
    mixed = load_examples(write_jsonl(tmp_path / "mixed.jsonl", [
        {"prompt": f"p{i}", "chosen": GOOD if i % 2 else BAD, "rejected": BAD if i % 2 else GOOD}
        for i in range(12)])).examples
    assert length_bias_warning(pair_stats([encode_pair(encoder, e) for e in mixed], 1024,
                                          "truncate")) is None


def test_dpo_refuses_sft_data_and_sft_trains_on_the_chosen_answers(tmp_path, tiny_tokenizer,
                                                                  small_chat_file):
    encoder = _encoder(tiny_tokenizer)
    with pytest.raises(DataError, match="DPO trains on preference pairs.*chat format"):
        prepare_data(TrainConfig(data=str(small_chat_file), objective="dpo"), encoder)
    sft = prepare_data(TrainConfig(data=str(_pairs(tmp_path))), encoder)
    assert any("trains on the chosen answers" in w for w in sft.warnings)
    decoded = tiny_tokenizer.decode([t for t in sft.train[0].labels if t != IGNORE])
    assert GOOD in decoded and BAD not in decoded
    dpo = prepare_data(TrainConfig(data=str(_pairs(tmp_path)), objective="dpo"), encoder)
    assert len(dpo.train) + len(dpo.held) == 12 and dpo.train[0].rejected.n_supervised > 0
    assert dpo.report["stats"]["preference"]["pairs"] == 12
    assert any("rejected answer is longer" in w for w in dpo.warnings)
