"""Validation: every problem of a data file is reported, located, and never a crash.

Most tests write VALID_COUNT good chat examples plus one bad line, so the file meets the
10-example minimum and the only error is the one under test.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from afinar.cli import app
from afinar.data.example import Message
from afinar.data.split import split_examples
from afinar.data.stats import duplicates_and_contradictions
from afinar.data.validate import MIN_EXAMPLES, RECOMMENDED_EXAMPLES, load_examples
from afinar.errors import AfinarError

VALID_COUNT = 12
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"},
                         {"role": "assistant", "content": f"answer {i}"}]}


def valid_lines(n: int) -> list[str]:
    return [json.dumps(chat(i)) for i in range(n)]


def write_raw(path: Path, lines: list[str | bytes], end: bytes = b"\n") -> Path:
    """Joins lines (str lines are UTF-8 encoded, bytes written as is)."""
    data = end.join(l.encode("utf-8") if isinstance(l, str) else l for l in lines) + end
    path.write_bytes(data)
    return path


def with_bad_line(tmp_path: Path, bad: str | bytes | dict, n: int = VALID_COUNT) -> Path:
    """n valid chat lines, then `bad` as line n+1."""
    bad_line = json.dumps(bad) if isinstance(bad, dict) else bad
    return write_raw(tmp_path / "data.jsonl", valid_lines(n) + [bad_line])


def only_error(report):
    """The single error of the report (a size warning may come along)."""
    assert not report.ok
    assert len(report.errors) == 1, [str(i) for i in report.errors]
    return report.errors[0]


def run_cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    output = ANSI.sub("", result.output)
    return result, output


# --- per-line errors ---------------------------------------------------------------------------

def test_invalid_json(tmp_path):
    report = load_examples(with_bad_line(tmp_path, '{"messages": [{"role": "user",'))
    err = only_error(report)
    assert (err.line, err.field) == (VALID_COUNT + 1, "")
    assert "invalid JSON" in err.message
    assert len(report.examples) == VALID_COUNT


def test_content_is_a_number(tmp_path):
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 42}]}
    err = only_error(load_examples(with_bad_line(tmp_path, bad)))
    assert (err.line, err.field) == (VALID_COUNT + 1, "messages[1].content")
    assert "not a string" in err.message


def test_content_missing(tmp_path):
    bad = {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}
    err = only_error(load_examples(with_bad_line(tmp_path, bad)))
    assert (err.line, err.field) == (VALID_COUNT + 1, "messages[0].content")
    assert "missing" in err.message


@pytest.mark.parametrize("messages", [{"role": "user", "content": "hi"}, "hello", None, []])
def test_messages_not_a_list(tmp_path, messages):
    err = only_error(load_examples(with_bad_line(tmp_path, {"messages": messages})))
    assert (err.line, err.field) == (VALID_COUNT + 1, "messages")
    assert "non-empty list" in err.message


def test_message_not_an_object(tmp_path):
    bad = {"messages": ["hi", {"role": "assistant", "content": "a"}]}
    err = only_error(load_examples(with_bad_line(tmp_path, bad)))
    assert (err.line, err.field) == (VALID_COUNT + 1, "messages[0]")
    assert "object" in err.message


@pytest.mark.parametrize("role", ["human", "Assistant", "", 3, None])
def test_unknown_role(tmp_path, role):
    bad = {"messages": [{"role": role, "content": "hi"}, {"role": "assistant", "content": "a"}]}
    err = only_error(load_examples(with_bad_line(tmp_path, bad)))
    assert (err.line, err.field) == (VALID_COUNT + 1, "messages[0].role")
    assert "unknown role" in err.message and repr(role) in err.message


@pytest.mark.parametrize("content", ["", "   ", "\n\t "])
def test_empty_or_whitespace_content(tmp_path, content):
    bad = {"messages": [{"role": "user", "content": "hi"},
                        {"role": "assistant", "content": content}]}
    err = only_error(load_examples(with_bad_line(tmp_path, bad)))
    assert (err.line, err.field) == (VALID_COUNT + 1, "messages[1].content")
    assert "empty" in err.message


def test_non_text_content_part(tmp_path):
    bad = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "x"}}]},
        {"role": "assistant", "content": "a"}]}
    err = only_error(load_examples(with_bad_line(tmp_path, bad)))
    assert (err.line, err.field) == (VALID_COUNT + 1, "messages[0].content[1]")
    assert "text parts" in err.message


def test_no_assistant_turn(tmp_path):
    bad = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]}
    err = only_error(load_examples(with_bad_line(tmp_path, bad)))
    assert (err.line, err.field) == (VALID_COUNT + 1, "messages")
    assert "no assistant message" in err.message


def test_sharegpt_no_assistant_turn_names_conversations(tmp_path):
    good = [json.dumps({"conversations": [{"from": "human", "value": f"q{i}"},
                                          {"from": "gpt", "value": f"a{i}"}]})
            for i in range(VALID_COUNT)]
    bad = json.dumps({"conversations": [{"from": "human", "value": "q"}]})
    err = only_error(load_examples(write_raw(tmp_path / "s.jsonl", good + [bad])))
    assert (err.line, err.field) == (VALID_COUNT + 1, "conversations")
    assert "no assistant message" in err.message


def test_all_assistant_weights_zero(tmp_path):
    bad = {"messages": [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a", "weight": 0},
                        {"role": "user", "content": "q2"},
                        {"role": "assistant", "content": "a2", "weight": 0}]}
    err = only_error(load_examples(with_bad_line(tmp_path, bad)))
    assert (err.line, err.field) == (VALID_COUNT + 1, "messages")
    assert "weight 0" in err.message and "nothing to learn" in err.message


@pytest.mark.parametrize("weight", [0.5, 2, -1, "1", True, None])
def test_weight_not_0_or_1(tmp_path, weight):
    bad = {"messages": [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a", "weight": 1},
                        {"role": "assistant", "content": "b", "weight": weight}]}
    err = only_error(load_examples(with_bad_line(tmp_path, bad)))
    assert (err.line, err.field) == (VALID_COUNT + 1, "messages[2].weight")
    assert "must be 0 or 1" in err.message and repr(weight) in err.message


def test_weight_on_user_message(tmp_path):
    bad = {"messages": [{"role": "user", "content": "q", "weight": 1},
                        {"role": "assistant", "content": "a"}]}
    err = only_error(load_examples(with_bad_line(tmp_path, bad)))
    assert (err.line, err.field) == (VALID_COUNT + 1, "messages[0].weight")
    assert "only allowed on assistant" in err.message and "user" in err.message


def test_tool_calls_are_rejected(tmp_path):
    bad = {"messages": [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a",
                         "tool_calls": [{"id": "1", "type": "function"}]}]}
    err = only_error(load_examples(with_bad_line(tmp_path, bad)))
    assert (err.line, err.field) == (VALID_COUNT + 1, "messages[1]")
    assert "tool calls" in err.message


def test_several_problems_in_one_line_are_all_reported(tmp_path):
    bad = {"messages": [{"role": "robot", "content": "q"},
                        {"role": "user", "content": 5},
                        {"role": "assistant", "content": "a", "weight": 0.5}]}
    report = load_examples(with_bad_line(tmp_path, bad))
    assert not report.ok
    assert [(i.line, i.field) for i in report.errors] == [
        (VALID_COUNT + 1, "messages[0].role"),
        (VALID_COUNT + 1, "messages[1].content"),
        (VALID_COUNT + 1, "messages[2].weight"),
    ]


def test_non_utf8_line_other_lines_still_parsed(tmp_path):
    lines = valid_lines(6) + [b'{"messages": "caf\xe9"}'] + valid_lines(6)
    report = load_examples(write_raw(tmp_path / "latin1.jsonl", lines))
    err = only_error(report)
    assert (err.line, err.field) == (7, "")
    assert "UTF-8" in err.message and "0xe9" in err.message
    assert len(report.examples) == 12
    assert [e.line for e in report.examples] == [*range(1, 7), *range(8, 14)]


@pytest.mark.parametrize("line,kind", [("[1, 2]", "an array"), ('"str"', "a string"),
                                       ("42", "a number"), ("null", "null"),
                                       ("true", "a boolean")])
def test_non_object_line(tmp_path, line, kind):
    lines = valid_lines(6) + [line] + valid_lines(6)
    report = load_examples(write_raw(tmp_path / "data.jsonl", lines))
    err = only_error(report)
    assert (err.line, err.field) == (7, "")
    assert "expected a JSON object" in err.message and kind in err.message
    assert len(report.examples) == 12


def test_non_object_first_line_is_located_not_a_json_array(tmp_path):
    report = load_examples(write_raw(tmp_path / "data.jsonl", ["[1, 2]"] + valid_lines(12)))
    err = only_error(report)
    assert (err.line, err.field) == (1, "")
    assert "expected a JSON object" in err.message
    assert len(report.examples) == 12


def test_json_array_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([chat(i) for i in range(12)], indent=2), encoding="utf-8")
    report = load_examples(path)
    err = only_error(report)
    assert err.line == 1
    assert "JSON array" in err.message and "JSON Lines" in err.message
    assert report.examples == []


@pytest.mark.parametrize("content", [b"", b"   \n\n\t\r\n", b"\xef\xbb\xbf", b"\xef\xbb\xbf\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    report = load_examples(path)
    err = only_error(report)
    assert err.line == 0
    assert "empty" in err.message
    assert report.examples == [] and report.format is None


def test_mixed_formats_error_on_the_minority_line(tmp_path):
    lines = valid_lines(6) + [json.dumps({"prompt": "p", "completion": "c"})] + valid_lines(6)
    report = load_examples(write_raw(tmp_path / "mixed.jsonl", lines))
    assert report.format == "chat"
    err = only_error(report)
    assert (err.line, err.field) == (7, "")
    assert "mixed formats" in err.message
    assert "prompt_completion" in err.message and "chat" in err.message
    assert len(report.examples) == 12


def test_unknown_format_line(tmp_path):
    lines = valid_lines(12) + [json.dumps({"question": "q", "answer": "a"})]
    err = only_error(load_examples(write_raw(tmp_path / "u.jsonl", lines)))
    assert (err.line, err.field) == (13, "")
    assert "unknown example format" in err.message


def test_unknown_format_everywhere_names_the_keys(tmp_path):
    lines = [json.dumps({"question": f"q{i}", "answer": "a"}) for i in range(12)]
    report = load_examples(write_raw(tmp_path / "u.jsonl", lines))
    assert not report.ok and report.format is None
    located = [i for i in report.errors if i.line == 1]
    assert len(located) == 1
    assert "unknown example format" in located[0].message
    assert "answer" in located[0].message and "question" in located[0].message


def test_preference_pairs_are_read_as_pairs(tmp_path):
    lines = [json.dumps({"prompt": f"p{i}", "chosen": "good", "rejected": "bad"})
             for i in range(12)]
    report = load_examples(write_raw(tmp_path / "pref.jsonl", lines))
    assert report.ok and report.format == "preference"
    assert [(ex.final_answer(), ex.rejected) for ex in report.examples] == [("good", "bad")] * 12


# --- errors are collected, not first-only --------------------------------------------------------

def test_three_different_bad_lines_are_all_reported(tmp_path):
    lines = (valid_lines(4) + ["{not json"] + valid_lines(4)
             + [json.dumps({"messages": [{"role": "wizard", "content": "x"},
                                         {"role": "assistant", "content": "y"}]})]
             + valid_lines(4)
             + [json.dumps({"messages": [{"role": "user", "content": "q"},
                                         {"role": "assistant", "content": "a",
                                          "weight": 2}]})])
    report = load_examples(write_raw(tmp_path / "three.jsonl", lines))
    assert not report.ok
    assert [(i.line, i.field) for i in report.errors] == [
        (5, ""), (10, "messages[0].role"), (15, "messages[1].weight")]
    assert "invalid JSON" in report.errors[0].message
    assert "unknown role" in report.errors[1].message
    assert "0 or 1" in report.errors[2].message
    assert len(report.examples) == 12


# --- size -------------------------------------------------------------------------------------------

def test_too_few_examples_is_an_error(tmp_path):
    report = load_examples(write_raw(tmp_path / "nine.jsonl", valid_lines(MIN_EXAMPLES - 1)))
    err = only_error(report)
    assert (err.line, err.field) == (0, "")
    assert "only 9 usable examples" in err.message and "at least 10" in err.message
    assert len(report.examples) == 9


def test_bad_lines_do_not_count_towards_the_minimum(tmp_path):
    lines = valid_lines(9) + ["{bad"] * 5
    report = load_examples(write_raw(tmp_path / "d.jsonl", lines))
    assert any(i.line == 0 and "only 9 usable" in i.message for i in report.errors)


@pytest.mark.parametrize("n", [MIN_EXAMPLES, 50, RECOMMENDED_EXAMPLES - 1])
def test_between_10_and_99_examples_is_a_warning(tmp_path, n):
    report = load_examples(write_raw(tmp_path / "d.jsonl", valid_lines(n)))
    assert report.ok and report.errors == []
    assert len(report.warnings) == 1
    warning = report.warnings[0]
    assert (warning.line, warning.severity) == (0, "warning")
    assert f"{n} examples" in warning.message
    assert "50-100" in warning.message and "stable" in warning.message


@pytest.mark.parametrize("n", [RECOMMENDED_EXAMPLES, 150])
def test_100_or_more_examples_no_size_warning(tmp_path, n):
    report = load_examples(write_raw(tmp_path / "d.jsonl", valid_lines(n)))
    assert report.ok and report.issues == []
    assert len(report.examples) == n


def test_size_checks_skipped_when_not_for_training(tmp_path):
    path = write_raw(tmp_path / "prompts.jsonl",
                     [json.dumps({"messages": [{"role": "user", "content": "q"}]})])
    report = load_examples(path, for_training=False)
    assert report.ok and report.issues == []
    assert report.examples[0].messages == (Message("user", "q"),)


# --- tolerated encodings ----------------------------------------------------------------------------

def test_crlf_bom_blank_lines_and_emoji_parse_fine(tmp_path):
    emoji = {"messages": [{"role": "user", "content": "¿Qué tal? 👋🏽 日本語"},
                          {"role": "assistant", "content": "¡Bien! 🎉\r\nSegunda línea"}]}
    lines = ([json.dumps(emoji, ensure_ascii=False)] + [""] + valid_lines(5) + ["", "  "]
             + valid_lines(5))
    data = b"\xef\xbb\xbf" + b"\r\n".join(l.encode("utf-8") for l in lines) + b"\r\n"
    path = tmp_path / "windows.jsonl"
    path.write_bytes(data)
    report = load_examples(path)
    assert report.ok and report.errors == []
    assert report.format == "chat"
    assert len(report.examples) == 11
    first = report.examples[0]
    assert first.line == 1
    assert first.messages == (Message("user", "¿Qué tal? 👋🏽 日本語"),
                              Message("assistant", "¡Bien! 🎉\r\nSegunda línea", True))
    assert [e.line for e in report.examples[1:]] == [*range(3, 8), *range(10, 15)]
    assert all(not m.content.endswith("\r") for e in report.examples for m in e.messages)


def test_escaped_emoji_is_decoded(tmp_path):
    lines = [json.dumps({"text": "hi 👋"}, ensure_ascii=True)] + [
        json.dumps({"text": f"t{i}"}) for i in range(11)]
    report = load_examples(write_raw(tmp_path / "t.jsonl", lines))
    assert report.ok
    assert report.examples[0].text == "hi 👋"


# --- user errors that stop validation ---------------------------------------------------------------

def test_missing_file_raises_afinar_error(tmp_path):
    with pytest.raises(AfinarError, match="no such file"):
        load_examples(tmp_path / "nope.jsonl")


def test_directory_raises_afinar_error(tmp_path):
    with pytest.raises(AfinarError, match="folder"):
        load_examples(tmp_path)


# --- crash-proofing beyond the brief --------------------------------------------------------------

def test_deeply_nested_json_is_an_issue_not_a_crash(tmp_path):
    deep = '{"a": ' + "[" * 50000 + "]" * 50000 + "}"
    err = only_error(load_examples(with_bad_line(tmp_path, deep)))
    assert err.line == VALID_COUNT + 1
    assert "invalid JSON" in err.message


def test_huge_integer_is_an_issue_not_a_crash(tmp_path):
    report = load_examples(with_bad_line(tmp_path, '{"messages": ' + "1" * 5000 + "}"))
    err = only_error(report)
    assert err.line == VALID_COUNT + 1


# --- the CLI ---------------------------------------------------------------------------------------

def test_cli_good_file_exits_0(tmp_path):
    path = write_raw(tmp_path / "good.jsonl", valid_lines(RECOMMENDED_EXAMPLES))
    result, output = run_cli("validate", str(path), "--no-tokens")
    assert result.exit_code == 0, output
    assert "Traceback" not in output
    summary = " ".join(output.split())  # rich wraps the summary line at the console width
    assert "100 examples, format chat, 0 errors, 0 warnings: usable" in summary
    assert "not usable" not in summary


def test_cli_warning_only_file_exits_0(tmp_path):
    path = write_raw(tmp_path / "few.jsonl", valid_lines(MIN_EXAMPLES))
    result, output = run_cli("validate", str(path), "--no-tokens")
    assert result.exit_code == 0, output
    assert "warning" in output


def test_cli_bad_file_exits_1_with_located_issue(tmp_path):
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}
    path = with_bad_line(tmp_path, bad)
    result, output = run_cli("validate", str(path), "--no-tokens")
    assert result.exit_code == 1, output
    assert f"{path}:{VALID_COUNT + 1}: messages[1].content: is empty" in output
    assert "not usable" in " ".join(output.split())
    assert "Traceback" not in output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_cli_lists_every_bad_line(tmp_path):
    lines = valid_lines(12) + ["{oops", json.dumps({"messages": [
        {"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}]})]
    path = write_raw(tmp_path / "two.jsonl", lines)
    result, output = run_cli("validate", str(path), "--no-tokens")
    assert result.exit_code == 1
    assert f"{path}:13: invalid JSON" in output
    assert f"{path}:14: messages[0].weight: weight is only allowed" in output


def test_cli_json_report(tmp_path):
    path = with_bad_line(tmp_path, "{oops")
    result = CliRunner().invoke(app, ["validate", str(path), "--no-tokens", "--json"])
    assert result.exit_code == 1
    report = json.loads(ANSI.sub("", result.stdout))
    assert report["ok"] is False and report["examples"] == VALID_COUNT
    assert [(i["line"], i["severity"]) for i in report["issues"]] == [
        (0, "warning"), (VALID_COUNT + 1, "error")]


@pytest.mark.parametrize("make", ["missing", "folder"])
def test_cli_missing_file_or_folder_is_a_clean_error(tmp_path, make):
    target = tmp_path / "nope.jsonl" if make == "missing" else tmp_path
    result, output = run_cli("validate", str(target), "--no-tokens")
    assert result.exit_code == 1
    assert "error:" in output and str(target) in output
    assert "Traceback" not in output
    assert isinstance(result.exception, SystemExit)


def test_cli_user_text_with_rich_markup_does_not_crash(tmp_path):
    bad = {"messages": [{"role": "[/]", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = with_bad_line(tmp_path, bad)
    result, output = run_cli("validate", str(path), "--no-tokens")
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    assert result.exit_code == 1
    assert f"{path}:{VALID_COUNT + 1}: messages[0].role: unknown role '[/]'" in output


_PIECES = [b"\xff", b"\x00", b"{", b"}", b"[", b"]", b"\n", b"\r\n", b'"', b":", b",", b"1",
           b"a", b" ", b"\xef\xbb\xbf", b'"messages"', b'"role"', b'"content"', b"null",
           b"\xe9", b"\xf0\x9f\x91\x8b"]


def _random_blobs(count: int = 30) -> list[bytes]:
    rng = random.Random(0)
    blobs = []
    for _ in range(count):
        blobs.append(b"".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 80))))
    # a few shaped ones: valid lines with garbage around them
    good = "\n".join(valid_lines(3)).encode()
    blobs += [good + b"\n\xff\xfe\n" + good, b"[" + good, good + b"\n[", b"\x00" * 10, b"{" * 300]
    return blobs


def test_cli_random_bytes_never_crash(tmp_path):
    runner = CliRunner()
    for n, blob in enumerate(_random_blobs()):
        path = tmp_path / f"fuzz{n}.jsonl"
        path.write_bytes(blob)
        result = runner.invoke(app, ["validate", str(path), "--no-tokens"])
        assert result.exit_code in (0, 1), (blob, result.output, result.exception)
        assert result.exception is None or isinstance(result.exception, SystemExit), \
            (blob, repr(result.exception))
        assert "Traceback" not in result.output, blob


def test_console_script_subprocess(tmp_path):
    script = Path(sys.executable).parent / "afinar"
    assert script.exists(), script
    bad = {"messages": [{"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "a", "weight": 0.5}]}
    path = with_bad_line(tmp_path, bad)
    proc = subprocess.run([str(script), "validate", str(path), "--no-tokens"],
                          capture_output=True, text=True, timeout=60)
    output = ANSI.sub("", proc.stdout + proc.stderr)
    assert proc.returncode == 1, output
    assert f"{path}:{VALID_COUNT + 1}: messages[1].weight: must be 0 or 1, got 0.5" in output
    assert "Traceback" not in output


# --- split ------------------------------------------------------------------------------------------

def _examples(tmp_path, lines: list[str], name: str = "d.jsonl"):
    report = load_examples(write_raw(tmp_path / name, lines))
    assert report.errors == [] or all(i.line == 0 for i in report.errors)
    return report.examples


def _key(example):
    return (example.messages, example.text)


def test_split_deterministic_and_20_percent(tmp_path):
    examples = _examples(tmp_path, valid_lines(50))
    train, held = split_examples(examples, 0.2, seed=1)
    assert (len(train), len(held)) == (40, 10)
    assert sorted(e.line for e in train + held) == list(range(1, 51))
    again_train, again_held = split_examples(examples, 0.2, seed=1)
    assert [e.line for e in again_train] == [e.line for e in train]
    assert [e.line for e in again_held] == [e.line for e in held]
    other = split_examples(examples, 0.2, seed=2)[1]
    assert {e.line for e in other} != {e.line for e in held}


def test_split_rounds_up_and_holds_at_least_one(tmp_path):
    examples = _examples(tmp_path, valid_lines(12))
    assert len(split_examples(examples, 0.2, 0)[1]) == 3  # ceil(2.4)
    assert len(split_examples(examples, 0.01, 0)[1]) == 1
    assert split_examples(examples, 0.0, 0) == (examples, [])
    assert split_examples(examples[:1], 0.5, 0) == (examples[:1], [])


def test_split_identical_examples_same_side(tmp_path):
    lines = valid_lines(30)
    lines += [lines[i] for i in (0, 0, 3, 7, 7, 7, 12, 20, 25, 29)]
    examples = _examples(tmp_path, lines)
    for seed in range(10):
        train, held = split_examples(examples, 0.2, seed)
        assert len(train) + len(held) == len(examples)
        assert not {_key(e) for e in train} & {_key(e) for e in held}, seed
        assert len(held) >= 8


def test_split_everything_identical_keeps_some_training(tmp_path):
    examples = _examples(tmp_path, valid_lines(1) * 12)
    train, held = split_examples(examples, 0.2, 0)
    assert (len(train), len(held)) == (11, 1)


# --- duplicates and contradictions ------------------------------------------------------------------

def test_duplicates_and_contradictions(tmp_path):
    def conv(q, a):
        return json.dumps({"messages": [{"role": "user", "content": q},
                                        {"role": "assistant", "content": a}]})

    lines = [
        conv("q0", "a0"),        # 1
        conv("refund?", "yes"),  # 2 contradiction
        conv("q2", "a2"),        # 3 duplicate of 7 and 9
        conv("refund?", "no"),   # 4 contradiction
        conv("q4", "a4"),        # 5
        conv("Q4", "a4"),        # 6 different prompt (case) -> neither
        conv("q2", "a2"),        # 7
        conv("q7", "a7"),        # 8
        conv("q2", "a2"),        # 9
        conv("q9", "a9"),        # 10
        conv("refund?", "yes"),  # 11 duplicate of 2, same contradiction group
    ]
    found = duplicates_and_contradictions(_examples(tmp_path, lines))
    assert sorted(found["duplicate_groups"]) == [[2, 11], [3, 7, 9]]
    assert found["contradiction_groups"] == [[2, 4, 11]]


def test_no_duplicates_no_contradictions(tmp_path):
    found = duplicates_and_contradictions(_examples(tmp_path, valid_lines(20)))
    assert found == {"duplicate_groups": [], "contradiction_groups": []}


def test_same_answer_different_system_is_not_a_contradiction(tmp_path):
    def conv(system, a):
        return json.dumps({"messages": [{"role": "system", "content": system},
                                        {"role": "user", "content": "hi"},
                                        {"role": "assistant", "content": a}]})

    found = duplicates_and_contradictions(_examples(tmp_path, [conv("formal", "Good day."),
                                                               conv("casual", "Hey!")]))
    assert found["contradiction_groups"] == []


def test_text_duplicates(tmp_path):
    lines = [json.dumps({"text": t}) for t in ["a", "b", "a", "c", "a"]]
    found = duplicates_and_contradictions(_examples(tmp_path, lines))
    assert found == {"duplicate_groups": [[1, 3, 5]], "contradiction_groups": []}
