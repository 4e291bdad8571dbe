"""The verification verdict on hand-made results: what passes, what fails and why."""

from __future__ import annotations

from afinar.export.verify import (CHAT_PROBES, LlamaChecks, VerifyReport, compare_answer, judge,
                                  template_tokens, tokenizer_probes)


def _result(ref, got, near_tie=None, same_ids=True, window=8):
    result = compare_answer("p", same_ids, ref, got, window, lambda ids: str(ids), True)
    result.near_tie = near_tie
    return result


def test_exact_types_need_identical_first_tokens():
    report = VerifyReport("f16", "llama.cpp", True, 8, 1.0)
    report.prompts = [_result([1, 2, 3, 4], [1, 2, 3, 4]), _result([5, 6, 7], [5, 6, 9])]
    assert not judge(report).passed
    assert "1 answer(s) differ within the first 8 tokens, e.g. at token 3" in report.problems[0]
    assert report.agreement == (4 + 2) / (4 + 3)


def test_a_near_tie_is_allowed_but_counted_and_a_clear_margin_is_not():
    tie = VerifyReport("bf16", "llama.cpp", True, 8, 1.0)
    tie.prompts = [_result([1, 2, 3], [1, 2, 4], near_tie=0.005)]
    assert judge(tie).passed and tie.summary()["parted_at_near_tie"] == 1
    sure = VerifyReport("bf16", "llama.cpp", True, 8, 1.0)
    sure.prompts = [_result([1, 2, 3], [1, 2, 4], near_tie=0.2)]
    assert not judge(sure).passed
    # The same margin is too wide for f32, whose logits must match far more closely.
    f32 = VerifyReport("f32", "llama.cpp", True, 8, 1.0)
    f32.prompts = [_result([1, 2, 3], [1, 2, 4], near_tie=0.005)]
    assert not judge(f32).passed


def test_quantised_types_need_the_agreement_rate_and_ids_always_matter():
    q = VerifyReport("q4_k_m", "llama.cpp", False, 4, 0.5)
    q.prompts = [_result([1, 2, 3, 4], [1, 2, 3, 9], window=4), _result([1, 2], [1, 7], window=4)]
    assert judge(q).passed and q.agreement == 4 / 6
    q.min_agreement = 0.9
    assert not judge(q).passed and "below the required 90%" in q.problems[0]
    ids = VerifyReport("q8_0", "llama.cpp", False, 4, 0.0)
    ids.prompts = [_result([1], [1], same_ids=False)]
    assert not judge(ids).passed and "prompt token ids differ" in ids.problems[0]
    ids.tokenizer_mismatches = ["12345"]
    assert "tokenises 1 probe" in judge(ids).problems[0]


def test_quantised_types_are_judged_by_teacher_forcing_when_measured():
    """A flip at the second token ruins the free answer's common prefix; teacher forcing sees
    that the export chose the trained model's token everywhere else."""
    q = VerifyReport("q8_0", "llama.cpp", False, 8, 0.9)
    ref = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    free = [1, 9, 9, 9, 9, 9, 9, 9]
    forced = [1, 9, 3, 4, 5, 6, 7, 8, 9, 10]  # 9 of 10 chosen alike, given the same context
    q.prompts = [compare_answer("p", True, ref, free, 8, str, True, forced=forced)]
    assert q.agreement == 1 / 8 and q.forced_agreement == 0.9
    assert judge(q).passed and q.summary()["teacher_forced_agreement"] == 0.9
    assert "teacher-forced agreement" in q.lines()[0]
    q.min_agreement = 0.95
    assert not judge(q).passed and "teacher-forced agreement 90.0% is below" in q.problems[0]


def test_a_chat_template_mismatch_fails_naming_the_first_differing_conversation():
    report = VerifyReport("f16", "llama.cpp", True, 8, 1.0)
    report.prompts = [_result([1, 2], [1, 2])]
    assert judge(report).passed
    report.chat_template_mismatches = ["[user] ending 'hola', from token 1: ...", "[user] ..."]
    assert not judge(report).passed
    assert report.problems == ["the file's own chat template gives other prompt ids than the "
                               "trained model's for 2 probe conversation(s): [user] ending "
                               "'hola', from token 1: ..."]
    assert report.summary()["chat_template_probes_mismatched"] == 2
    assert "chat template probes mismatched: 2" in report.lines()[1]


def test_llama_checks_say_which_probe_and_where_a_conversation_parts():
    user = [{"role": "user", "content": "x"}]
    checks = LlamaChecks(["a", "b"], [[1], [2]], [user, [*user, *user]], [[5, 6, 7], [8]],
                         decode=lambda ids: f"<{ids[0]}>")
    texts, chats = checks.mismatches({"probes": [[1], [3]],
                                      "chats": [[5, 6, 9], {"error": "no chat template"}]})
    assert texts == ["b"]
    assert chats == ["[user] ending 'x', from token 3: trained [7] '<7>', GGUF [9] '<9>'",
                     "[user, user] ending 'x': no chat template"]
    # A prompt cut short is named too; all equal means nothing to report.
    assert checks.mismatches({"probes": [[1], [2]], "chats": [[5, 6], [8]]})[1] == [
        "[user] ending 'x', from token 3: trained [7] '<7>', GGUF the end"]
    assert checks.mismatches({"probes": [[1], [2]], "chats": [[5, 6, 7], [8]]}) == ([], [])
    # A child that answered without the chats (an older one) cannot pass silently.
    assert checks.mismatches({"probes": [[1], [2]]})[1]


def test_probes_carry_the_family_special_tokens_and_the_hard_cases(tiny_tokenizer):
    specials = template_tokens(tiny_tokenizer)
    assert specials == ["<|im_start|>", "<|im_end|>"]  # ChatML's; its EOS is <|im_end|>
    probes = tokenizer_probes(tiny_tokenizer)
    assert "<|im_start|>" in probes and "<|im_start|>hola <|im_start|>\n<|im_end|>hola " \
        "<|im_end|>\n" in probes
    joined = "".join(probes)
    assert all(c in joined for c in "ñé😀日") and "1234567" in joined and "def " in joined
    roles = [[m["role"] for m in chat] for chat in CHAT_PROBES]
    assert ["user"] in roles and ["system", "user"] in roles
    assert ["system", "user", "assistant", "user"] in roles
