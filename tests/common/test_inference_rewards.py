"""common/inference.py's reward helpers for RL recipes: a reward function from a file, its checked call, the
reward-model text, the sampling prompts and the scoring of completions by source."""
import pytest
import torch

from common.config import UserError
from common.data import ALPACA_PROMPT_NO_INPUT, Record
from common.inference import (
    call_reward_function,
    encode_prompt,
    generation_prompt,
    load_reward_function,
    reward_model_request,
    reward_model_text,
    sampling_prompts,
    score_completions,
)


def write(path, text):
    path.write_text(text)
    return path


def test_load_reward_function_by_path_and_name(tmp_path):
    file = write(tmp_path / "my_rewards.py", "def score(p, c, r):\n    return [len(x) for x in c]\n\n"
                                              "def other(p, c, r):\n    return [1.0] * len(c)\n")
    assert load_reward_function(str(file))([], ["ab", "c"], []) == [2, 1]  # no name: `score`
    assert load_reward_function(f"{file}:other")([], ["ab"], []) == [1.0]


@pytest.mark.parametrize("spec,expected", [
    ("{dir}/missing.py:score", "--reward_fn={dir}/missing.py:score: no such Python file {dir}/missing.py; expected "
                               "path/to/rewards.py:function"),
    ("{dir}/ok.py:nope", "--reward_fn={dir}/ok.py:nope: {dir}/ok.py has no function 'nope'; expected one of score, "
                         "called as nope(prompts, completions, records)"),
    ("{dir}/broken.py", "--reward_fn={dir}/broken.py: importing {dir}/broken.py failed: ZeroDivisionError: division "
                        "by zero"),
])
def test_load_reward_function_errors_are_one_line(tmp_path, spec, expected):
    write(tmp_path / "ok.py", "import math\n\ndef score(p, c, r):\n    return [0.0] * len(c)\n")
    write(tmp_path / "broken.py", "x = 1 / 0\n")
    with pytest.raises(UserError) as e:
        load_reward_function(spec.format(dir=tmp_path))
    assert str(e.value) == expected.format(dir=tmp_path)


def test_call_reward_function_checks_what_comes_back():
    assert call_reward_function(lambda p, c, r: [1, 0.5], ["p"] * 2, ["a", "b"], [{}] * 2) == [1.0, 0.5]
    bad = {"[1.0]": "score returned 1 values for 2 completions; expected one number per completion",
           "[1.0, 'x']": "score returned 'x' for completion 1; expected a finite number",
           "[True, 1.0]": "score returned True for completion 0; expected a finite number",
           "[1.0, float('nan')]": "score returned nan for completion 1; expected a finite number",
           "None": "score returned NoneType; expected a list of one number per completion"}
    for returned, message in bad.items():
        namespace = {}
        exec(f"def score(p, c, r):\n    return {returned}\n", namespace)
        with pytest.raises(UserError) as e:
            call_reward_function(namespace["score"], ["p"] * 2, ["a", "b"], [{}] * 2)
        assert str(e.value) == f"--reward_fn: {message}"


def test_reward_model_request_and_text(tokenizer):
    alpaca = Record({"instruction": "Reverse the letters.", "input": "a b", "output": "b a"}, "f:1")
    assert reward_model_request(alpaca) == "Reverse the letters.\n\na b"
    assert reward_model_request(Record({"instruction": "Hi", "input": " "}, "f:2")) == "Hi"
    assert reward_model_request(Record({"prompt": "Say x", "answer": "x"}, "f:3")) == "Say x"
    chat = Record({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}, "f:4")
    assert reward_model_request(chat) == [{"role": "user", "content": "Q"}]
    # as cls/reward-qlora renders its pairs: the Alpaca prompt without input, then the response
    assert reward_model_text(tokenizer, "Reverse the letters.\n\na b", "b a", "alpaca") == \
        ALPACA_PROMPT_NO_INPUT.format(instruction="Reverse the letters.\n\na b") + "b a"
    assert reward_model_text(tokenizer, [{"role": "user", "content": "Q"}], "A", "alpaca") == \
        ALPACA_PROMPT_NO_INPUT.format(instruction="Q") + "A"


def test_sampling_prompts_render_as_training_and_carry_the_answer(tokenizer):
    records = [Record({"instruction": "Reverse the letters.", "input": "c c i g", "output": "g i c c"}, "f:1"),
               Record({"prompt": "Say hi", "answer": "hi"}, "f:2"), Record({"prompt": "Say nothing"}, "f:3")]
    prompts = sampling_prompts(records, tokenizer, "alpaca", 512)
    text, add_special = generation_prompt(records[0], tokenizer)
    assert prompts[0]["text"] == text and prompts[0]["ids"] == encode_prompt(tokenizer, text, add_special)
    assert [p["record"].data["answer"] for p in prompts] == ["g i c c", "hi", None]
    assert prompts[0]["record"].data["input"] == "c c i g" and prompts[0]["record"].where == "f:1"
    cut = sampling_prompts(records[:1], tokenizer, "alpaca", 10)[0]["ids"]
    full = prompts[0]["ids"]
    assert len(cut) == 10 and cut[0] == tokenizer.bos_token_id and cut[1:] == full[-9:]  # BOS kept, the end kept


def test_score_completions_by_source():
    records = [Record({"prompt": "p", "answer": "x"}, "f:1"), Record({"prompt": "p", "answer": "y"}, "f:2")]

    def score(prompts, completions, records):
        return [float(c == r["answer"]) for c, r in zip(completions, records)]

    rewards = score_completions(score, None, ["p", "p"], ["x", "x"], records, 8)
    assert list(rewards) == ["reward_fn"]
    torch.testing.assert_close(rewards["reward_fn"], torch.tensor([1.0, 0.0], dtype=torch.float64))
