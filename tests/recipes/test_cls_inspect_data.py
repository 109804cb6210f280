"""--inspect_data on the four cls recipes: a data-only run that reads, tokenizes and reports the data (counts, labels
or pairs, one example as the model reads it), writes nothing and loads no weights (the model folder it gets has
none). In-process, a few seconds each; one run.sh call checks a bad record is the usual one-line error."""
import shutil
import time
from collections import Counter

import pytest

from tests.conftest import REPO, load_recipe, read_jsonl, run_script

DATA = REPO / "data" / "cls"
RECIPES = ["cls/qlora", "cls/peft-int4", "cls/full-ft-deepspeed-offload", "cls/reward-qlora"]


@pytest.fixture(scope="module")
def weightless_model(tiny_dir, tmp_path_factory):
    """The tiny model's folder without its weights: config and tokenizer only."""
    folder = tmp_path_factory.mktemp("weightless") / "tiny"
    shutil.copytree(tiny_dir, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    assert not list(folder.glob("*.safetensors"))
    return folder


@pytest.mark.parametrize("recipe", RECIPES)
def test_inspect_data_reports_the_data_writes_nothing_and_loads_no_weights(recipe, weightless_model, tokenizer,
                                                                           tmp_path, capsys):
    module = load_recipe(REPO / recipe)
    out = tmp_path / "out"
    args = [f"--model_path={weightless_model}", f"--output_dir={out}", "--inspect_data"]
    if recipe != "cls/reward-qlora":
        args.append(f"--predict_data_path={DATA / 'eval.jsonl'}")
    started = time.perf_counter()
    result = module.main(module.parse_config(module.Config, args))
    seconds = time.perf_counter() - started
    printed = capsys.readouterr().out
    assert result["inspect_data"] and not out.exists(), printed  # no config.json, metrics, checkpoints or final/
    lines = printed.splitlines()
    if recipe == "cls/reward-qlora":
        n_train = len(read_jsonl(DATA / "preference_train.jsonl"))
        n_eval = len(read_jsonl(DATA / "preference_eval.jsonl"))
        assert lines[0].startswith(f"data     train {DATA / 'preference_train.jsonl'}: {n_train} pairs, ")
        assert lines[1].startswith(f"         eval  {DATA / 'preference_eval.jsonl'}: {n_eval} pairs, ")
        assert lines[2].startswith("example  chosen '<s> Below is an instruction") and "rejected '<s> " in lines[3]
    else:
        train = read_jsonl(DATA / "train.jsonl")
        counts = Counter(r["label"] for r in train)
        by_class = ", ".join(f"{label} {counts[label]}" for label in sorted(counts))
        assert lines[0].startswith(f"data     train {DATA / 'train.jsonl'}: {len(train)} examples, ")
        assert lines[0].endswith(f"| labels {by_class}")
        n_eval = len(read_jsonl(DATA / "eval.jsonl"))
        assert lines[1].startswith(f"         eval  {DATA / 'eval.jsonl'}: {n_eval} examples, ")
        assert lines[2].startswith(f"         predict {DATA / 'eval.jsonl'}: {n_eval} examples, ")
        first_ids = tokenizer(train[0]["text"]).input_ids + [tokenizer.eos_token_id]  # as the model reads it
        assert lines[3] == f"example  {tokenizer.decode(first_ids)!r} -> {train[0]['label']!r}"
    assert result["train_stats"].truncated_examples == 0
    assert seconds < 120, seconds  # tokenizer only: seconds, even on a busy machine


def test_a_bad_predict_record_under_inspect_data_is_one_line(weightless_model, tmp_path):
    bad = tmp_path / "predict.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    proc = run_script(REPO / "cls" / "qlora" / "run.sh", "--inspect_data", f"--model_path={weightless_model}",
                      f"--predict_data_path={bad}", f"--output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == f"error: {bad}:2: field 'text' must be a string, got int"
    assert not (tmp_path / "out").exists()
