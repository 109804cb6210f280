"""What every recipe folder promises: run.sh, train.py and README.md (and ds_config.json where DeepSpeed runs), a
run.sh bash can parse, a Config whose defaults parse and whose every field is documented, no imports between
recipes, a saved config.json that is a --config, and `bash run.sh --data_path=X --eval_data_path=Y --output_dir=Z`
on files in the documented formats, with no third-party noise before the start-up block."""
import dataclasses
import json
import os
import re
import subprocess

import pytest
import zstandard

from tests.conftest import REPO, load_recipe, read_jsonl, run_script

RECIPES = sorted(p.parent for kind in ("sft", "cls", "pretrain", "rlhf") for p in (REPO / kind).glob("*/run.sh"))
IDS = [str(p.relative_to(REPO)) for p in RECIPES]


def test_the_recipe_matrix_is_all_there():
    assert set(IDS) >= {"sft/qlora", "sft/full-ft-deepspeed-offload", "sft/peft-int4", "cls/qlora",
                        "cls/full-ft-deepspeed-offload", "cls/peft-int4", "cls/reward-qlora"}


@pytest.mark.parametrize("recipe", RECIPES, ids=IDS)
def test_folder_is_complete_and_run_sh_parses(recipe):
    for name in ("run.sh", "train.py", "README.md"):
        assert (recipe / name).is_file(), name
    if "deepspeed" in recipe.name:
        json.loads((recipe / "ds_config.json").read_text())
    proc = subprocess.run(["bash", "-n", str(recipe / "run.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = (recipe / "run.sh").read_text()
    assert '"$@"' in text and "set -euo pipefail" in text


@pytest.mark.parametrize("recipe", RECIPES, ids=IDS)
def test_config_defaults_parse_and_every_field_is_documented(recipe):
    from common.config import config_help, field_comments

    module = load_recipe(recipe)
    cfg = module.parse_config(module.Config, [])
    assert cfg == module.Config()
    assert getattr(cfg, "model_path", getattr(cfg, "model_config", None)) == "tiny" and cfg.output_dir == "./out"
    for f in dataclasses.fields(module.Config):  # defaults that name bundled data point at files that exist
        value = getattr(cfg, f.name)
        if f.name.endswith("data_path") and value:
            assert (recipe / value).resolve().exists(), (f.name, value)
    comments = field_comments(module.Config)
    undocumented = [f.name for f in dataclasses.fields(module.Config) if not comments.get(f.name)]
    assert not undocumented, undocumented
    assert all(f"--{f.name}=" in config_help(module.Config) for f in dataclasses.fields(module.Config))


@pytest.mark.parametrize("recipe", RECIPES, ids=IDS)
def test_saved_config_json_is_a_config_file_that_gives_the_same_config(recipe, tmp_path):
    from common.config import save_config

    module = load_recipe(recipe)
    cfg = module.parse_config(module.Config, ["--output_dir=elsewhere", "--max_steps=3"])
    saved = save_config(cfg, tmp_path)
    assert module.parse_config(module.Config, [f"--config={saved}"]) == cfg
    assert module.parse_config(module.Config, [f"--config={saved}", "--max_steps=5"]).max_steps == 5


@pytest.mark.slow
def test_config_json_reruns_a_run_with_the_same_losses(tmp_path):
    """Re-running a run is --config=out/config.json (into another --output_dir): the losses come out the same."""
    recipe = REPO / "cls" / "qlora"
    first, second = tmp_path / "first", tmp_path / "second"
    proc = run_script(recipe / "run.sh", f"--output_dir={first}", "--max_steps=3", "--log_every=1",
                      "--report_to=none", "--lr=2e-3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = run_script(recipe / "run.sh", f"--config={first / 'config.json'}", f"--output_dir={second}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [[r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] for out in (first, second)]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    assert json.loads((second / "config.json").read_text())["lr"] == 2e-3


@pytest.mark.parametrize("recipe", RECIPES, ids=IDS)
def test_recipes_do_not_import_each_other(recipe):
    source = (recipe / "train.py").read_text()
    assert not re.search(r"^\s*(from|import)\s+(sft|cls|pretrain|rlhf)\b", source, re.M)
    assert "sys.path" not in source


def write_jsonl_zst(path, records):
    path.write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()))



def user_files(recipe, tmp_path):
    """Training data as .jsonl.zst and eval data as a .json array, in the formats the recipe's README documents;
    the SFT training file mixes all three record formats; pretraining reads {"text"} documents."""
    data = REPO / "data"
    if recipe.parent.name == "sft":
        train = (read_jsonl(data / "sft" / "train.jsonl")[:8] + read_jsonl(data / "sft" / "chat.jsonl")[:4] +
                 read_jsonl(data / "sft" / "panda.jsonl")[:4])
        evals = read_jsonl(data / "sft" / "eval.jsonl")[:4] + read_jsonl(data / "sft" / "panda.jsonl")[-2:]
    elif recipe.parent.name == "pretrain":
        text = [r["output"] for r in read_jsonl(data / "sft" / "train.jsonl")]
        train = [{"text": " ".join(text[i:i + 5])} for i in range(0, 200, 5)]
        evals = [{"text": " ".join(text[i:i + 5])} for i in range(200, 240, 5)]
    elif recipe.parent.name == "rlhf" and recipe.name.startswith("dpo"):  # text pairs of both prompt kinds
        train = (read_jsonl(data / "cls" / "preference_train.jsonl")[:8] +
                 read_jsonl(data / "synthetic" / "reverse_preference_train.jsonl")[:8])
        evals = (read_jsonl(data / "cls" / "preference_eval.jsonl")[:3] +
                 read_jsonl(data / "synthetic" / "reverse_preference_eval.jsonl")[:3])
    elif recipe.parent.name == "rlhf":  # prompts with reference answers
        train = read_jsonl(data / "synthetic" / "reverse_train.jsonl")[:16]
        evals = read_jsonl(data / "synthetic" / "reverse_eval.jsonl")[:6]
    elif recipe.name.startswith("reward"):
        train = read_jsonl(data / "cls" / "preference_train.jsonl")[:16]
        evals = read_jsonl(data / "cls" / "preference_eval.jsonl")[:6]
    else:
        train, evals = read_jsonl(data / "cls" / "train.jsonl")[:32], read_jsonl(data / "cls" / "eval.jsonl")[:6]
    x, y = tmp_path / "my_train.jsonl.zst", tmp_path / "my eval.json"
    write_jsonl_zst(x, train)
    y.write_text(json.dumps(evals, ensure_ascii=False))
    return x, y


# what the libraries print on their own at start-up, which the recipes quiet (common/logs.py:quiet_third_party_logs,
# common/deepspeed_utils.py): torchao's GPU kernels failing to load on CPU, torch's pytree notices, DeepSpeed's
# accelerator detection and its shared-memory op, bitsandbytes' optional CPU kernel package
THIRD_PARTY_NOISE = ("Failed to load", "_pytree", "Setting accelerator to CPU", "built successfully",
                     "kernels-community")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=IDS)
def test_run_sh_trains_on_user_files(recipe, tmp_path):
    """From the user's own folder, with paths relative to it; the screen starts with the recipe's start-up block."""
    x, y = user_files(recipe, tmp_path)
    z = tmp_path / "run out"
    args = [f"--data_path={x.name}", f"--eval_data_path={y.name}", f"--output_dir={z.name}", "--max_steps=2",
            "--batch_size=4", "--grad_accum=1", "--log_every=1", "--report_to=none",
            *(["--eval_every=1"] if recipe.parent.name == "pretrain" else [])]
    # stdout and stderr as one stream, in the order a terminal shows them
    proc = subprocess.run(["bash", str(recipe / "run.sh"), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=600, cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-6000:]
    screen = [line for line in proc.stdout.splitlines() if line.strip()]
    assert re.fullmatch(r"[a-z]+ +", screen[0][:9]), screen[:5]  # the block's first line, e.g. "model    tiny ..."
    assert not [line for line in screen if any(noise in line for noise in THIRD_PARTY_NOISE)], proc.stdout[:3000]
    rows = read_jsonl(z / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert any("eval_loss" in r for r in rows)
    assert (z / "final").is_dir() and any((z / "final").iterdir())
    assert json.loads((z / "config.json").read_text())["data_path"] == x.name
