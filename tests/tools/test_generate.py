"""tools/generate.py: prompts rendered as in training, batched left-padded greedy generation equal to one prompt at a
time, base + adapter equal to the merged model, and the interactive mode on stdin."""
import json
import subprocess
import sys

import pytest

from common.data import ALPACA_PROMPT_NO_INPUT
from tests.conftest import REPO
from tests.tools.conftest import TOOLS, load_tool

generate = load_tool("generate")
RECORDS = [  # every prompt format, lengths from a few tokens to a long chat, so a batch needs padding
    {"instruction": "Give the opposite of the word \"hot\".", "input": "", "output": "cold"},
    {"prompt": "Once upon a time"},
    {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "What is the capital of Mexico? Answer in one short sentence."},
                  {"role": "assistant", "content": "Mexico City."}]},
    {"input": "Reverse: a b c", "target": "c b a"},
    {"instruction": "Translate the word into Chinese.", "input": "tea"},
]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS))
    return path


def run(out, prompts_file, *args) -> list[dict]:
    generate.main([f"--prompts={prompts_file}", f"--out={out}", "--max_new_tokens=12", *args])
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_batched_left_padded_greedy_equals_one_prompt_at_a_time(prompts_file, tmp_path):
    batched = run(tmp_path / "batched.jsonl", prompts_file, "--model=tiny", "--batch_size=5")
    single = run(tmp_path / "single.jsonl", prompts_file, "--model=tiny", "--batch_size=1")
    assert [r["output"] for r in batched] == [r["output"] for r in single]
    assert all(r["output"] for r in batched)
    prompts = [r["prompt"] for r in batched]  # input order, each rendered as the sft recipes render it
    assert prompts[0] == ALPACA_PROMPT_NO_INPUT.format(instruction=RECORDS[0]["instruction"])
    assert prompts[1] == "Once upon a time" and prompts[3] == "Reverse: a b c"
    assert prompts[2].endswith("<|user|>\nWhat is the capital of Mexico? Answer in one short sentence.\n"
                               "<|assistant|>\n") and "Mexico City." not in prompts[2]
    assert "### Input:\ntea\n\n### Response:\n" in prompts[4]


def test_base_plus_adapter_equals_merged_model(prompts_file, sft_adapter, merged_sft, tmp_path):
    with_adapter = run(tmp_path / "adapter.jsonl", prompts_file, "--model=tiny", f"--adapter={sft_adapter}")
    merged = run(tmp_path / "merged.jsonl", prompts_file, f"--model={merged_sft}", "--batch_size=2")
    assert [r["output"] for r in with_adapter] == [r["output"] for r in merged]
    # --model defaults to the base the adapter names
    default_base = run(tmp_path / "default.jsonl", prompts_file, f"--adapter={sft_adapter}")
    assert default_base == with_adapter


def test_sampling_is_repeatable_with_a_seed(prompts_file, tmp_path):
    def sample(name, seed):
        return run(tmp_path / name, prompts_file, "--model=tiny", "--do_sample", "--temperature=1.5", f"--seed={seed}")

    first, again = sample("a.jsonl", 1), sample("b.jsonl", 1)
    assert first == again


@pytest.mark.slow  # the tool in a child process
def test_interactive_streams_each_answer_and_skips_bad_lines(prompts_file, tmp_path):
    """As a user runs it: a subprocess reading stdin; each answer equals the file mode's greedy answer."""
    expected = run(tmp_path / "expected.jsonl", prompts_file, "--model=tiny", "--max_new_tokens=6")
    lines = [RECORDS[0]["instruction"], "{not json", json.dumps(RECORDS[1])]
    proc = subprocess.run([sys.executable, str(TOOLS / "generate.py"), "--model=tiny", "--interactive",
                           "--max_new_tokens=6"], input="\n".join(lines) + "\n", capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    answers = [line for line in proc.stdout.splitlines() if line.strip()]
    assert [a.strip() for a in answers] == [expected[0]["output"].strip(), expected[1]["output"].strip()]
    assert "error: stdin:2: malformed JSON" in proc.stderr


def test_missing_prompts_file_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--model=tiny", f"--prompts={tmp_path / 'none.jsonl'}", f"--out={tmp_path / 'o.jsonl'}"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'none.jsonl'}: no such file"


@pytest.mark.parametrize("data, template", [("eval.jsonl", "alpaca"), ("chat.jsonl", "alpaca"),
                                            ("eval.jsonl", "chat")])
def test_prompt_tokens_are_the_start_of_the_training_example(data, template, tokenizer):
    """What the model is asked is exactly what it saw before the (last) answer in training."""
    from common.data import build_sft_examples, read_records
    from common.inference import encode_prompt, generation_prompt

    records = read_records(REPO / "data" / "sft" / data)[:20]
    examples, _ = build_sft_examples(records, tokenizer, 4096, template)
    for record, example in zip(records, examples):
        prompt = encode_prompt(tokenizer, *generation_prompt(record, tokenizer, template))
        first_trained = len(example["labels"]) - next(i for i, label in enumerate(reversed(example["labels"]))
                                                      if label == -100)  # where the last answer starts
        assert prompt == example["input_ids"][:first_trained], record.where
