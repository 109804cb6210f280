"""cls/qlora and cls/reward-qlora on the real SmolLM2-135M-Instruct (NF4 base + LoRA + a new score head), a few steps
on short English slices of the bundled sentiment and preference data."""
import json
import math
from collections import Counter

import pytest

from tests.conftest import REPO, read_metrics, run_script
from tests.real_model.conftest import CLS_DATA, english_records, write_jsonl

pytestmark = pytest.mark.slow  # the real checkpoint: end-to-end recipe runs

SHORT = ["--max_seq_len=64", "--log_every=1", "--lora_r=8", "--report_to=none"]


def test_sentiment_classifier_beats_the_majority_class_in_24_steps(smollm2_dir, tmp_path):
    """Measured: accuracy 0.40 -> 0.83 (eval loss 1.51 -> 0.70); 8 steps gave only 0.57, lr 5e-4 for 24 steps 0.47."""
    train = write_jsonl(tmp_path / "train.jsonl", english_records(CLS_DATA / "train.jsonl", 192))
    eval_records = english_records(CLS_DATA / "eval.jsonl", 30)
    evals = write_jsonl(tmp_path / "eval.jsonl", eval_records)
    out = tmp_path / "out"
    proc = run_script(REPO / "cls" / "qlora" / "run.sh", f"--model_path={smollm2_dir}", f"--data_path={train}",
                      f"--eval_data_path={evals}", "--batch_size=8", "--max_steps=24", "--lr=1e-3",
                      f"--output_dir={out}", *SHORT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "eval_results.json").read_text())
    majority = Counter(r["label"] for r in eval_records).most_common(1)[0][1] / len(eval_records)
    assert results["accuracy"] > majority + 0.25, (results["accuracy"], majority)  # the eval file's own majority class
    eval_losses = [r["eval_loss"] for r in read_metrics(out) if "eval_loss" in r]
    assert eval_losses[-1] < eval_losses[0] - 0.4, eval_losses


def test_reward_model_learns_the_preferred_answers(smollm2_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", english_records(CLS_DATA / "preference_train.jsonl", 32))
    evals = write_jsonl(tmp_path / "eval.jsonl", english_records(CLS_DATA / "preference_eval.jsonl", 16))
    out = tmp_path / "out"
    proc = run_script(REPO / "cls" / "reward-qlora" / "run.sh", f"--model_path={smollm2_dir}", f"--data_path={train}",
                      f"--eval_data_path={evals}", "--prompt_template=chat", "--batch_size=4", "--lr=1e-3",
                      "--max_steps=8", f"--output_dir={out}", *SHORT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_metrics(out)
    losses = [r["loss"] for r in rows if "loss" in r]
    evals_rows = [r for r in rows if "eval_loss" in r]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    before, after = evals_rows[0], evals_rows[-1]
    assert after["eval_loss"] < 0.5 * before["eval_loss"], evals_rows  # measured: 0.62 -> 0.001
    assert after["eval_pairwise_accuracy"] >= 0.9, evals_rows  # chance is 0.5; 0.75 before training


def test_reward_chat_text_keeps_its_first_turn_start(smollm2_dir):
    """SmolLM2's BOS is <|im_start|>, which its tokenizer never adds: the chat text's leading <|im_start|> is the
    first turn's, not a BOS to drop (it was dropped, so reward models saw 'system\\nYou are...' without it)."""
    from common.data import Record, build_preference_examples
    from common.model import load_tokenizer

    tokenizer = load_tokenizer(smollm2_dir)
    record = Record({"prompt": "What is the capital of Peru?", "chosen": "Lima.", "rejected": "I don't know."}, "x:1")
    examples, _ = build_preference_examples([record], tokenizer, 128, "chat")
    conversation = [{"role": "user", "content": "What is the capital of Peru?"},
                    {"role": "assistant", "content": "Lima."}]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    expected = tokenizer(rendered, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert examples[0]["chosen_ids"] == expected
    assert tokenizer.convert_ids_to_tokens(expected[:2]) == ["<|im_start|>", "system"]
