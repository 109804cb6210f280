"""render_trained_example: the decoded example with its trained (labelled) part marked."""
import pytest

from common.data import Record, build_sft_examples, pack_examples, render_trained_example
from common.model import load_tokenizer, resolve_model_path

PROMPT = ("<s> Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\nSay hi\n\n### Response:\n")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_path("tiny"))


@pytest.fixture(scope="module")
def alpaca(tokenizer):
    examples, _ = build_sft_examples([Record({"instruction": "Say hi", "output": "Hi"}, "t.jsonl:1")], tokenizer, 512)
    return examples[0]


def test_alpaca_prompt_unmarked_answer_and_eos_marked(tokenizer, alpaca):
    assert render_trained_example(alpaca, tokenizer, color=False) == PROMPT + "[[Hi</s>]]"


def test_color_wraps_the_answer_in_green(tokenizer, alpaca):
    assert render_trained_example(alpaca, tokenizer, color=True) == PROMPT + "\033[32mHi</s>\033[0m"


def test_train_on_prompt_marks_all_but_the_first_token(tokenizer):
    record = Record({"instruction": "Say hi", "output": "Hi"}, "t.jsonl:1")
    examples, _ = build_sft_examples([record], tokenizer, 512, train_on_prompt=True)
    assert render_trained_example(examples[0], tokenizer, color=False) == "<s>[[" + PROMPT[3:] + "Hi</s>]]"


def test_long_example_cut_in_the_middle(tokenizer, alpaca):
    rendered = render_trained_example(alpaca, tokenizer, max_chars=40, color=False)
    full_length = len(PROMPT) + len("Hi</s>")
    assert rendered == PROMPT[:20] + f" [... {full_length - 40} characters ...] " + PROMPT[-14:] + "[[Hi</s>]]"


def test_chat_replies_marked_each_and_packed_rows_keep_their_examples(tokenizer, alpaca):
    messages = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi there"},
                {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Hi"}]
    examples, _ = build_sft_examples([Record({"messages": messages}, "t.jsonl:2")], tokenizer, 512)
    chat = ("<s><|user|>\nSay hi\n<|assistant|>\n[[Hi there</s>\n]]<|user|>\nAgain\n<|assistant|>\n[[Hi</s>\n]]")
    assert render_trained_example(examples[0], tokenizer, color=False) == chat
    packed = pack_examples([alpaca, examples[0]], 512)
    assert len(packed) == 1
    assert render_trained_example(packed[0], tokenizer, color=False) == PROMPT + "[[Hi</s>]]" + chat
