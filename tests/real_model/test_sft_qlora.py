"""sft/qlora on the real SmolLM2-135M-Instruct with its chat template, and the tools on its adapter: one training run
(8 steps of 4 English alpaca records, 128 tokens) shared by every test of this module."""
import json
import math

import pytest
import torch

from tests.conftest import REPO, read_metrics, run_script
from tests.real_model.conftest import SFT_DATA, english_records, write_jsonl
from tests.tools.conftest import load_tool

pytestmark = pytest.mark.slow  # the real checkpoint: end-to-end recipe runs

RECIPE = REPO / "sft" / "qlora"
PROMPTS = [{"instruction": "What is the capital of Italy?"},
           {"instruction": "Give the opposite of the word \"up\"."},
           {"instruction": "How many letters does the word have?", "input": "snow"}]
TEXTS = ("The capital of France is", "Give the opposite of the word \"cold\".")


@pytest.fixture(scope="module")
def sft_run(smollm2_dir, tmp_path_factory):
    """(out folder, eval file) of one sft/qlora run on SmolLM2 with --prompt_template=chat."""
    folder = tmp_path_factory.mktemp("sft_smollm2")
    train = write_jsonl(folder / "train.jsonl", english_records(SFT_DATA / "train.jsonl", 16))
    evals = write_jsonl(folder / "eval.jsonl", english_records(SFT_DATA / "eval.jsonl", 8))
    out = folder / "out"
    proc = run_script(RECIPE / "run.sh", f"--model_path={smollm2_dir}", "--prompt_template=chat",
                      f"--data_path={train}", f"--eval_data_path={evals}", "--max_seq_len=128", "--batch_size=4",
                      "--grad_accum=1", "--max_steps=8", "--lr=1e-3", "--lora_r=8", "--report_to=none",
                      f"--output_dir={out}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, evals


@pytest.fixture(scope="module")
def merged(sft_run, smollm2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged_smollm2") / "sft"
    load_tool("merge_lora").main([f"--base={smollm2_dir}", f"--adapter={sft_run[0] / 'final'}", f"--out={out}"])
    return out


def eval_losses(out) -> list[float]:
    return [r["eval_loss"] for r in read_metrics(out) if "eval_loss" in r]


def test_chat_sft_starts_from_a_low_eval_loss_and_lowers_it(sft_run):
    out, _ = sft_run
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    before, after = eval_losses(out)
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert before < 3, before  # a pretrained instruct model already knows the format: a random one is near ln(49152)
    assert after < before - 0.05, (before, after)
    assert (out / "final" / "adapter_model.safetensors").is_file()


def test_evaluate_tool_reproduces_the_runs_final_eval_loss(sft_run):
    out, evals = sft_run
    results = load_tool("evaluate").main([f"--adapter={out / 'final'}", f"--data={evals}", "--load_in_4bit",
                                          "--prompt_template=chat", "--max_seq_len=128", "--exact_match=false"])
    assert results["examples"] == 8
    assert results["loss"] == pytest.approx(eval_losses(out)[-1], abs=1e-3)


def test_merged_model_gives_the_logits_of_base_plus_adapter(sft_run, merged, smollm2_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from common.data import collate_left_padded
    from common.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(smollm2_dir)
    batch = collate_left_padded([{"input_ids": tokenizer(t).input_ids} for t in TEXTS], tokenizer.pad_token_id)
    base = load_model(smollm2_dir).eval()
    with torch.no_grad():
        plain = base(**batch).logits
        with_adapter = PeftModel.from_pretrained(base, str(sft_run[0] / "final")).eval()(**batch).logits
        from_merged = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()(**batch).logits
    real = batch["attention_mask"].bool()  # pad positions are never read
    # W + BA summed once in fp32 rounds unlike x W + x B A: the gap grows with the logit (measured: 20 of 688,128
    # logits 1.1e-4 apart, relative 5e-5, with the dropout-free default adapter)
    torch.testing.assert_close(from_merged[real], with_adapter[real], atol=1e-4, rtol=1e-4)
    assert (with_adapter - plain)[real].abs().max() > 1e-2  # the adapter matters, so the equality means something


def test_merged_model_answers_in_chat_and_stops_at_end_of_turn(merged, smollm2_dir, tmp_path):
    from common.model import load_tokenizer

    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    answers = tmp_path / "answers.jsonl"
    load_tool("generate").main([f"--model={merged}", f"--prompts={prompts}", f"--out={answers}",
                                "--prompt_template=chat", "--max_new_tokens=64"])
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    tokenizer = load_tokenizer(smollm2_dir)
    lengths = [len(tokenizer(r["output"], add_special_tokens=False).input_ids) for r in rows]
    assert all(r["prompt"].endswith("<|im_start|>assistant\n") for r in rows), rows[0]["prompt"]
    assert all(0 < n < 40 for n in lengths), rows  # stopped at <|im_end|>, far before max_new_tokens
    assert "rome" in rows[0]["output"].lower(), rows


def test_exported_gguf_of_base_plus_adapter_gives_the_merged_logits(sft_run, merged, smollm2_dir, tmp_path):
    """tools/export_gguf.py on the trained adapter (merged on the fly, f16, the chat template it trained with):
    transformers reads the file back to the merged model's logits (f16 weights: within 0.05 of logits up to ~30), the
    byte-level BPE tokenizer to the same ids, and the Modelfile carries ChatML in Ollama's syntax."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.data import collate_left_padded
    from common.model import load_tokenizer

    out = tmp_path / "sft.gguf"
    result = load_tool("export_gguf").export_gguf(str(smollm2_dir), str(out), str(sft_run[0] / "final"), "f16",
                                                  "chat")
    assert result["tokenizer"] == "gpt2" and result["pre"] == "gpt-2"
    tokenizer = load_tokenizer(merged)
    batch = collate_left_padded([{"input_ids": tokenizer(t).input_ids} for t in TEXTS], tokenizer.pad_token_id)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()(**batch).logits[real]
        back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
        got = back(**batch).logits[real]
    assert (got - expected).abs().max() < 0.05, (got - expected).abs().max()
    back_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    for text in (*TEXTS, chat):
        assert back_tokenizer(text).input_ids == tokenizer(text).input_ids, text
    modelfile = out.with_suffix(".Modelfile").read_text()
    assert '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


def test_llama_cpp_answers_as_transformers_on_the_exported_gguf(sft_run, smollm2_dir):
    """llama.cpp itself (llama-cpp-python, built from source: skipped where it is not installed, as in CI) on the f16
    export of the trained adapter: every chat prompt tokenized to transformers' ids and answered with transformers'
    greedy tokens (bench/gguf_llama_cpp.py, which prints this comparison)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (see bench/gguf_llama_cpp.py)")
    from bench.gguf_llama_cpp import compare

    (row,) = compare(str(smollm2_dir), str(sft_run[0] / "final"), ["f16"], "chat", new_tokens=16, threads=2)
    assert row["same_ids"] == row["prompts"] == 4
    assert row["same_greedy"] == row["prompts"], (row["llama_cpp"], row["transformers"])
