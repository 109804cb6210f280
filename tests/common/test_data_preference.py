"""build_preference_pairs: each side of a pair masked as an SFT example, conversational pairs split at the shared
prompt, truncation that keeps the answers, and one-line errors naming the record and field."""
import pytest

from common.data import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    IGNORE_INDEX,
    DataError,
    Record,
    build_preference_pairs,
)


def trained_text(tokenizer, pair, side):
    return tokenizer.decode([t for t in pair[f"{side}_labels"] if t != IGNORE_INDEX])


def test_text_pair_is_the_alpaca_prompt_with_only_the_answer_and_eos_trained(tokenizer):
    record = Record({"prompt": "Reverse the letters.", "chosen": "b a", "rejected": "a b"}, "p.jsonl:1")
    (pair,), stats = build_preference_pairs([record], tokenizer, 256)
    prompt = ALPACA_PROMPT_NO_INPUT.format(instruction="Reverse the letters.")
    for side, answer in (("chosen", "b a"), ("rejected", "a b")):
        expected = tokenizer(prompt + answer).input_ids + [tokenizer.eos_token_id]
        assert pair[f"{side}_ids"] == expected
        n_prompt = len(tokenizer(prompt).input_ids)
        assert pair[f"{side}_labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert trained_text(tokenizer, pair, side) == f"{answer}</s>"
    assert (stats.examples, stats.truncated_examples) == (1, 0)


def test_instruction_and_input_render_as_the_sft_recipes_alpaca_prompt(tokenizer):
    record = Record({"instruction": "Reverse the letters.", "input": "a b", "chosen": "b a", "rejected": "a b"}, "x:1")
    (pair,), _ = build_preference_pairs([record], tokenizer, 256)
    prompt = ALPACA_PROMPT.format(instruction="Reverse the letters.", input="a b")
    assert pair["chosen_ids"] == tokenizer(prompt + "b a").input_ids + [tokenizer.eos_token_id]


def conversation(*texts):
    roles = ["user", "assistant"] * len(texts)
    return [{"role": role, "content": text} for role, text in zip(roles, texts, strict=False)]


def test_conversational_pair_trains_only_the_final_reply_and_shares_the_prompt(tokenizer):
    record = Record({"chosen": conversation("hi", "hello", "a joke?", "Why did the chicken..."),
                     "rejected": conversation("hi", "hello", "a joke?", "No.")}, "hh.jsonl:3")
    (pair,), _ = build_preference_pairs([record], tokenizer, 256)
    assert trained_text(tokenizer, pair, "chosen").startswith("Why did the chicken...</s>")
    assert trained_text(tokenizer, pair, "rejected").startswith("No.</s>")
    assert "hello" not in trained_text(tokenizer, pair, "chosen")  # an earlier assistant turn is prompt here
    first_label = pair["chosen_labels"].index(next(t for t in pair["chosen_labels"] if t != IGNORE_INDEX))
    assert pair["chosen_ids"][:first_label] == pair["rejected_ids"][:first_label]  # the same prompt tokens


def test_a_prompt_list_goes_before_single_reply_sides(tokenizer):
    record = Record({"prompt": conversation("hi"), "chosen": [{"role": "assistant", "content": "hello"}],
                     "rejected": [{"role": "assistant", "content": "go away"}]}, "x:1")
    (pair,), _ = build_preference_pairs([record], tokenizer, 256)
    assert trained_text(tokenizer, pair, "rejected").startswith("go away</s>")


def test_long_pairs_lose_prompt_tokens_and_keep_their_answers(tokenizer):
    long_prompt = "Reverse the letters. " + "a b c d e f " * 30
    record = Record({"prompt": long_prompt, "chosen": "f e d", "rejected": "d e f"}, "x:1")
    (pair,), stats = build_preference_pairs([record], tokenizer, 40)
    assert len(pair["chosen_ids"]) == len(pair["rejected_ids"]) == 40
    assert pair["chosen_ids"][0] == tokenizer.bos_token_id
    assert trained_text(tokenizer, pair, "chosen") == "f e d</s>"
    assert stats.truncated_examples == 1 and stats.truncated_tokens > 0


@pytest.mark.parametrize("data, message", [
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "x.jsonl:7: fields 'chosen' and 'rejected' are identical"),
    ({"prompt": "p", "chosen": "a"}, "x.jsonl:7: missing field 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "x.jsonl:7: missing field 'prompt'"),
    ({"chosen": conversation("hi", "a"), "rejected": "b"},
     "x.jsonl:7: field 'rejected' must be a list of messages, as 'chosen' and 'rejected' are one kind; got str"),
    ({"chosen": conversation("hi", "a"), "rejected": conversation("hello", "b")},
     "x.jsonl:7: field 'chosen' must share every message with the other side but its final assistant reply; "
     "they part at message 0"),
    ({"chosen": conversation("hi", "a"), "rejected": conversation("hi", "a")},
     "x.jsonl:7: fields 'chosen' and 'rejected' end with the same reply"),
    ({"chosen": conversation("hi"), "rejected": conversation("hi", "b")},
     "x.jsonl:7: field 'messages' must end with a non-empty assistant message"),
])
def test_bad_pairs_are_one_line_naming_record_and_field(tokenizer, data, message):
    with pytest.raises(DataError) as error:
        build_preference_pairs([Record(data, "x.jsonl:7")], tokenizer, 256)
    assert str(error.value) == message
