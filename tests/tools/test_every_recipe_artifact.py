"""The tools on what every recipe writes to out/final: adapters merge (onto the full-precision tiny base, also for the
GPTQ-int4 and reward-model adapters), whole checkpoints generate and evaluate directly, and apply_delta rebuilds
a full fine-tune from the base exactly."""
import json

import pytest
import torch

from tests.conftest import REPO
from tests.tools.conftest import load_tool, one_thread, train

pytestmark = pytest.mark.slow  # every recipe trained, then the tools on its output

SFT_EVAL = REPO / "data" / "sft" / "eval.jsonl"
CLS_EVAL = REPO / "data" / "cls" / "eval.jsonl"

ADAPTER_RECIPES = {"sft/qlora": "sft", "sft/fsdp-qlora": "sft", "sft/peft-int4": "sft", "cls/qlora": "classification",
                   "cls/peft-int4": "classification", "cls/reward-qlora": "reward", "rlhf/dpo-qlora": "sft",
                   "rlhf/grpo-qlora": "sft"}
FULL_RECIPES = {"sft/full-ft-deepspeed-offload": "sft", "cls/full-ft-deepspeed-offload": "classification",
                "pretrain/deepspeed": "lm", "pretrain/fsdp": "lm"}


def first_records(path, n, tmp_path):
    lines = path.read_text(encoding="utf-8").splitlines()[:n]
    small = tmp_path / path.name
    small.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return small


@pytest.mark.parametrize("recipe", sorted(ADAPTER_RECIPES))
def test_adapter_of_every_lora_recipe_merges_and_is_usable(recipe, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kind = ADAPTER_RECIPES[recipe]
    final = train(recipe, tmp_path / "out", "--batch_size=4", "--lora_r=8")
    merged = tmp_path / "merged"
    with one_thread():
        load_tool("merge_lora").main(["--base=tiny", f"--adapter={final}", f"--out={merged}"])
        if kind == "sft":
            assert AutoModelForCausalLM.from_pretrained(merged) is not None
            answers = tmp_path / "answers.jsonl"
            load_tool("generate").main([f"--model={merged}", f"--prompts={first_records(SFT_EVAL, 3, tmp_path)}",
                                        f"--out={answers}", "--max_new_tokens=4"])
            assert len(answers.read_text().splitlines()) == 3
            result = load_tool("evaluate").main([f"--model={merged}", f"--data={first_records(SFT_EVAL, 4, tmp_path)}",
                                                 "--max_new_tokens=4"])
            assert torch.isfinite(torch.tensor(result["loss"])) and result["perplexity"] > 1
        elif kind == "classification":
            eval_records = first_records(CLS_EVAL, 12, tmp_path)
            result = load_tool("evaluate").main([f"--model={merged}", f"--data={eval_records}"])
            assert 0 <= result["accuracy"] <= 1 and len(result["confusion_matrix"]) == 3
        else:  # a reward model: one output, its reward_model.json kept beside it
            model = AutoModelForSequenceClassification.from_pretrained(merged)
            assert model.config.num_labels == 1 and (merged / "reward_model.json").is_file()


@pytest.mark.parametrize("recipe", sorted(FULL_RECIPES))
def test_checkpoint_of_every_full_recipe_generates_evaluates_and_round_trips_as_a_delta(recipe, tmp_path):
    from safetensors.torch import load_file

    from common.model import materialize_tiny_llama

    kind = FULL_RECIPES[recipe]
    args = ["--batch_size=4"] if recipe.startswith("pretrain") else ["--batch_size=4", "--lr=1e-3"]
    if recipe.startswith("pretrain"):
        args = ["--batch_size=2", "--init_from=tiny", "--tokenizer_path="]  # continued pretraining of the tiny base
    final = train(recipe, tmp_path / "out", *args)
    with one_thread():
        if kind in ("sft", "lm"):
            answers = tmp_path / "answers.jsonl"
            load_tool("generate").main([f"--model={final}", f"--prompts={first_records(SFT_EVAL, 3, tmp_path)}",
                                        f"--out={answers}", "--max_new_tokens=4"])
            assert [json.loads(line)["output"] is not None for line in answers.read_text().splitlines()] == [True] * 3
            result = load_tool("evaluate").main([f"--model={final}", f"--data={first_records(SFT_EVAL, 4, tmp_path)}",
                                                 "--exact_match=false"])
            assert result["perplexity"] > 1
        else:
            result = load_tool("evaluate").main([f"--model={final}", f"--data={first_records(CLS_EVAL, 12, tmp_path)}"])
            assert 0 <= result["accuracy"] <= 1
        if kind != "classification":  # the delta of a causal LM full fine-tune against the tiny base it started from
            delta, rebuilt = tmp_path / "delta", tmp_path / "rebuilt"
            tool = load_tool("apply_delta")
            tool.main(["make", f"--base={materialize_tiny_llama()}", f"--target={final}", f"--out={delta}"])
            tool.main(["apply", f"--base={materialize_tiny_llama()}", f"--delta={delta}", f"--out={rebuilt}"])
            expected, got = load_file(final / "model.safetensors"), load_file(rebuilt / "model.safetensors")
            assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
