"""--packing in every SFT recipe, in process on the tiny model: eight examples trained as one batch of left-padded
rows and as one batch of packed rows (several examples per row, position ids restarting, no attention across them)
are the same training: the first step's loss, computed before any update, is the same number, and so is the loss
after one update. The packed run computes fewer pad tokens."""
import json
import os
from pathlib import Path

import pytest

from tests.conftest import REPO, load_recipe, read_jsonl

RECIPES = ["sft/qlora", "sft/peft-int4", "sft/fsdp-qlora", "sft/full-ft-deepspeed-offload"]
# DeepSpeedCPUAdam is compiled with gcc on first use; share the build with the other DeepSpeed tests
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))


def train(recipe: str, data, out, packing: bool) -> dict:
    module = load_recipe(REPO / recipe)
    args = [f"--data_path={data}", "--eval_data_path=", f"--output_dir={out}", "--max_steps=2", "--batch_size=8",
            "--grad_accum=1", "--max_seq_len=512", "--log_every=1", "--report_to=none", f"--packing={packing}"]
    return module.main(module.parse_config(module.Config, args))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_packed_rows_train_as_the_same_examples_padded(recipe, tmp_path):
    data = tmp_path / "eight.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(REPO / "data" / "sft" / "train.jsonl")[:8]))
    padded = train(recipe, data, tmp_path / "padded", packing=False)
    packed = train(recipe, data, tmp_path / "packed", packing=True)
    assert len(padded["losses"]) == len(packed["losses"]) == 2
    assert packed["losses"][0] == pytest.approx(padded["losses"][0], rel=1e-5)  # the same model, the same tokens
    assert packed["losses"][1] == pytest.approx(padded["losses"][1], rel=1e-3)  # after the same update
    assert packed["losses"][1] < packed["losses"][0]
    assert packed["tokens"] == padded["tokens"] and packed["tokens_computed"] < padded["tokens_computed"]
