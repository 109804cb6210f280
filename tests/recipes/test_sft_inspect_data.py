"""--inspect_data on the four SFT recipes, in process: the data is read, rendered, tokenized and masked, the counts
and the first example (trained part marked) are printed, nothing is written and no model weights are read (the
model folder given has no weights file); a bad record is the usual one-line error."""
import shutil

import pytest

from common.config import UserError
from common.data import build_sft_examples, pack_examples, read_records, render_trained_example
from common.model import load_tokenizer
from tests.conftest import REPO, load_recipe

SFT_DATA = REPO / "data" / "sft"
RECIPES = ["sft/qlora", "sft/peft-int4", "sft/fsdp-qlora", "sft/full-ft-deepspeed-offload"]


def model_folder_without_weights(recipe: str, tmp_path):
    """The recipe's tiny model folder (GPTQ-quantized for peft-int4) copied without its *.safetensors."""
    if recipe == "sft/peft-int4":
        from common.gptq import materialize_tiny_gptq

        source = materialize_tiny_gptq()
    else:
        from common.model import materialize_tiny_llama

        source = materialize_tiny_llama()
    target = tmp_path / "no-weights"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors"))
    return target


def run_inspect(recipe: str, *args: str):
    module = load_recipe(REPO / recipe)
    return module.main(module.parse_config(module.Config, ["--inspect_data", *args]))


@pytest.mark.parametrize("recipe,packing", [(r, False) for r in RECIPES] + [(r, True) for r in RECIPES],
                         ids=[*RECIPES, *(f"{r}-packing" for r in RECIPES)])
def test_inspect_data_reports_the_data_and_loads_no_weights(recipe, packing, tmp_path, capsys):
    model_dir = model_folder_without_weights(recipe, tmp_path)
    out = tmp_path / "out"
    extra = ["--packing"] if packing else []
    result = run_inspect(recipe, f"--model_path={model_dir}", f"--output_dir={out}", "--max_seq_len=96", *extra)
    printed = capsys.readouterr().out
    assert result["inspect_data"] is True
    assert not out.exists()  # no config.json, metrics, checkpoints or final/

    tokenizer = load_tokenizer(model_dir)
    examples, stats = build_sft_examples(read_records(SFT_DATA / "train.jsonl"), tokenizer, 96)
    _, eval_stats = build_sft_examples(read_records(SFT_DATA / "eval.jsonl"), tokenizer, 96)
    assert stats.examples == 344 and stats.truncated_examples > 0  # max_seq_len 96 cuts the longest ones
    assert result["train_stats"] == stats and result["eval_stats"] == eval_stats
    assert f"data     train {SFT_DATA / 'train.jsonl'}: {stats.summary()}" in printed
    assert f"eval  {SFT_DATA / 'eval.jsonl'}: {eval_stats.summary()}" in printed
    lengths = sorted(len(e["input_ids"]) for e in examples)
    assert f"train lengths min {lengths[0]}, median {lengths[len(lengths) // 2]}, max 96 tokens" in printed
    assert f"example  {render_trained_example(examples[0], tokenizer, color=False)}\n" in printed
    assert printed.count("[[") == printed.count("]]") >= 1
    if packing:
        rows = pack_examples(examples, 96)
        assert f"packing  344 examples in {len(rows)} rows of up to 96 tokens" in printed
        assert f"packed row 1 {render_trained_example(rows[0], tokenizer, color=False)}\n" in printed
    else:
        assert "packed row" not in printed


@pytest.mark.parametrize("recipe", RECIPES)
def test_inspect_data_names_a_bad_record(recipe, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "Say hi", "output": "hi"}\n{"instruction": "Say hi"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: missing field 'output'"):
        run_inspect(recipe, f"--data_path={bad}", f"--output_dir={tmp_path / 'out'}")
    assert not (tmp_path / "out").exists()
