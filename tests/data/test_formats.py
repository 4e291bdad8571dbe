"""Every supported input format is read into exactly the expected `Example`s.

Files here hold only a handful of examples, so the file-level size error (line 0) is expected;
every other issue means the format was read wrongly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from afinar.data.example import Example, Message
from afinar.data.validate import load_examples
from afinar.errors import AfinarError


def write_lines(path: Path, lines: list) -> Path:
    """Writes dicts as JSON lines; a str is written verbatim (e.g. "" for a blank line)."""
    text = "\n".join(line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)
                     for line in lines)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def line_issues(report) -> list:
    """Issues located on a line (the size check is about the whole file, line 0)."""
    return [i for i in report.issues if i.line != 0]


def U(text):
    return Message("user", text, False)


def A(text, train=True):
    return Message("assistant", text, train)


def S(text):
    return Message("system", text, False)


# --- chat ------------------------------------------------------------------------------------

def test_chat_string_content_all_roles(tmp_path):
    path = write_lines(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}]},
        {"messages": [{"role": "developer", "content": "Answer in Spanish."},
                      {"role": "user", "content": "Thanks"},
                      {"role": "assistant", "content": "De nada."}]},
    ])
    report = load_examples(path)
    assert report.format == "chat"
    assert line_issues(report) == []
    assert [e.messages for e in report.examples] == [
        (S("Be brief."), U("Hi"), A("Hello.")),
        # OpenAI's developer role is stored as system
        (S("Answer in Spanish."), U("Thanks"), A("De nada.")),
    ]
    assert [e.line for e in report.examples] == [1, 2]
    assert all(e.is_chat and e.text is None for e in report.examples)
    assert all(e.path == str(path) for e in report.examples)


def test_chat_list_of_text_parts_is_joined(tmp_path):
    path = write_lines(tmp_path / "parts.jsonl", [
        {"messages": [
            {"role": "system", "content": [{"type": "text", "text": "Be "},
                                           {"type": "text", "text": "kind."}]},
            {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Four"},
                                              {"type": "text", "text": "."}]}]},
    ])
    report = load_examples(path)
    assert report.format == "chat"
    assert line_issues(report) == []
    assert len(report.examples) == 1
    assert report.examples[0].messages == (S("Be kind."), U("What is 2+2?"), A("Four."))


def test_chat_assistant_weights(tmp_path):
    path = write_lines(tmp_path / "weights.jsonl", [
        {"messages": [{"role": "user", "content": "q1"},
                      {"role": "assistant", "content": "draft", "weight": 0},
                      {"role": "user", "content": "q2"},
                      {"role": "assistant", "content": "final", "weight": 1},
                      {"role": "user", "content": "q3"},
                      {"role": "assistant", "content": "default"}]},
    ])
    report = load_examples(path)
    assert line_issues(report) == []
    msgs = report.examples[0].messages
    assert msgs == (U("q1"), A("draft", False), U("q2"), A("final", True), U("q3"),
                    A("default", True))
    assert [m.train for m in msgs] == [False, False, False, True, False, True]


def test_chat_extra_fields_are_kept(tmp_path):
    path = write_lines(tmp_path / "extra.jsonl", [
        {"id": 7, "messages": [{"role": "user", "content": "a"},
                               {"role": "assistant", "content": "b"}]},
    ])
    report = load_examples(path)
    assert report.examples[0].extra == {"id": 7}


def test_chat_line_numbers_skip_blank_lines(tmp_path):
    chat = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    other = {"messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    path = write_lines(tmp_path / "blank.jsonl", ["", chat, "", "   ", other])
    report = load_examples(path)
    assert line_issues(report) == []
    assert [e.line for e in report.examples] == [2, 5]
    assert [e.messages[1].content for e in report.examples] == ["b", "d"]


# --- prompt / completion -----------------------------------------------------------------------

def test_prompt_completion(tmp_path):
    path = write_lines(tmp_path / "pc.jsonl", [
        {"prompt": "Capital of France?", "completion": "Paris."},
        {"prompt": "2+2?", "completion": "4", "source": "math"},
    ])
    report = load_examples(path)
    assert report.format == "prompt_completion"
    assert line_issues(report) == []
    assert [e.messages for e in report.examples] == [
        (U("Capital of France?"), A("Paris.")),
        (U("2+2?"), A("4")),
    ]
    assert [e.line for e in report.examples] == [1, 2]
    assert report.examples[1].extra == {"source": "math"}


# --- Alpaca ---------------------------------------------------------------------------------------

def test_alpaca_with_and_without_input(tmp_path):
    path = write_lines(tmp_path / "alpaca.jsonl", [
        {"instruction": "Translate to English.", "input": "Hola", "output": "Hello"},
        {"instruction": "Name a colour.", "output": "Blue"},
        {"instruction": "Name a fruit.", "input": "", "output": "Apple"},
        {"instruction": "Name a tree.", "input": "   ", "output": "Oak"},
        {"instruction": "Say hi.", "input": None, "output": "Hi", "system": "Be polite."},
    ])
    report = load_examples(path)
    assert report.format == "alpaca"
    assert line_issues(report) == []
    assert [e.messages for e in report.examples] == [
        (U("Translate to English.\n\nHola"), A("Hello")),
        (U("Name a colour."), A("Blue")),
        (U("Name a fruit."), A("Apple")),
        (U("Name a tree."), A("Oak")),
        (S("Be polite."), U("Say hi."), A("Hi")),
    ]
    assert [e.line for e in report.examples] == [1, 2, 3, 4, 5]


# --- ShareGPT -------------------------------------------------------------------------------------

def test_sharegpt(tmp_path):
    path = write_lines(tmp_path / "sharegpt.jsonl", [
        {"conversations": [{"from": "system", "value": "You are terse."},
                           {"from": "human", "value": "Hi"},
                           {"from": "gpt", "value": "Hello"},
                           {"from": "human", "value": "Bye"},
                           {"from": "gpt", "value": "Bye"}]},
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
    ])
    report = load_examples(path)
    assert report.format == "sharegpt"
    assert line_issues(report) == []
    assert [e.messages for e in report.examples] == [
        (S("You are terse."), U("Hi"), A("Hello"), U("Bye"), A("Bye")),
        (U("Q"), A("A")),
    ]
    assert [e.line for e in report.examples] == [1, 2]


# --- raw text -------------------------------------------------------------------------------------

def test_text(tmp_path):
    path = write_lines(tmp_path / "text.jsonl", [
        {"text": "The quick brown fox."},
        "",
        {"text": "  leading and trailing spaces kept  "},
    ])
    report = load_examples(path)
    assert report.format == "text"
    assert line_issues(report) == []
    assert [(e.text, e.messages, e.line) for e in report.examples] == [
        ("The quick brown fox.", (), 1),
        ("  leading and trailing spaces kept  ", (), 3),
    ]
    assert not any(e.is_chat for e in report.examples)


# --- the format override ------------------------------------------------------------------------

def test_format_override_chat_on_a_chat_file(tmp_path):
    path = write_lines(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    ])
    report = load_examples(path, format="chat")
    assert report.format == "chat"
    assert line_issues(report) == []
    assert report.examples[0].messages == (U("a"), A("b"))


def test_format_override_chat_parses_every_line_as_chat(tmp_path):
    # Detected, this file is prompt_completion (2 lines against 1) and line 3 is "mixed".
    path = write_lines(tmp_path / "mixed.jsonl", [
        {"prompt": "p1", "completion": "c1"},
        {"prompt": "p2", "completion": "c2"},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    ])
    detected = load_examples(path)
    assert detected.format == "prompt_completion"
    assert [(i.line, "mixed formats" in i.message) for i in line_issues(detected)] == [(3, True)]

    forced = load_examples(path, format="chat")
    assert forced.format == "chat"
    assert [e.line for e in forced.examples] == [3]
    assert forced.examples[0].messages == (U("a"), A("b"))
    # the prompt/completion lines are now wrong chat lines, not "mixed formats"
    assert [(i.line, i.field) for i in line_issues(forced)] == [(1, "messages"), (2, "messages")]
    assert all("non-empty list" in i.message for i in line_issues(forced))


def test_format_override_text_beats_detection(tmp_path):
    path = write_lines(tmp_path / "both.jsonl", [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
         "text": "raw"},
    ])
    assert load_examples(path).examples[0].messages == (U("a"), A("b"))
    forced = load_examples(path, format="text")
    assert forced.format == "text"
    assert [(e.text, e.messages) for e in forced.examples] == [("raw", ())]


def test_unknown_format_override_is_a_user_error(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", [{"text": "a"}])
    with pytest.raises(AfinarError, match="unknown format"):
        load_examples(path, format="csv")


def test_example_is_the_only_internal_type(tmp_path):
    path = write_lines(tmp_path / "pc.jsonl", [{"prompt": "p", "completion": "c"}])
    example = load_examples(path).examples[0]
    assert isinstance(example, Example)
    assert example.prompt_messages() == (U("p"),)
    assert example.final_answer() == "c"
    assert example.where == f"{path}:1"
