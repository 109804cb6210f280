"""pretrain/deepspeed and pretrain/fsdp end to end on CPU with the tiny config, and the whole path from raw files to
a pretrained checkpoint: shard_corpus -> train_tokenizer -> pretokenize -> pretraining, and merge_tokenizer ->
continued pretraining with a grown vocabulary."""
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO, load_recipe, read_metrics, run_script

DEEPSPEED, FSDP = REPO / "pretrain" / "deepspeed", REPO / "pretrain" / "fsdp"
SHARDS = REPO / "data" / "pretrain" / "shards"
SCRIPTS = REPO / "data_scripts"
pretrain_ds, pretrain_fsdp = load_recipe(DEEPSPEED), load_recipe(FSDP)
RECIPES = {"deepspeed": pretrain_ds, "fsdp": pretrain_fsdp}
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
FAST = ["--report_to=none", "--log_every=1", "--warmup_steps=2"]
# the shared uninterrupted run: checkpoints at steps 3 and 6, two loader workers (the data position is per worker),
# two micro-batches a step, documents masked from each other
STRAIGHT = ["--max_steps=6", "--save_every=3", "--num_workers=2", "--batch_size=4", "--grad_accum=2", "--document_mask"]
PROBE = "The river runs to the sea. 今天天气很好。"


def run_main(recipe, out, *args):
    return recipe.main(recipe.parse_config(recipe.Config, [f"--output_dir={out}", *FAST, *args]))


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory) -> dict:
    """One STRAIGHT run per recipe, shared by the tests that compare against it (each recipe run costs seconds of
    start-up): its output folder, losses, and the trained model's logits on PROBE, taken as the run returned."""
    runs = {}
    for name, recipe in RECIPES.items():
        out = tmp_path_factory.mktemp(name) / "out"
        result = run_main(recipe, out, *STRAIGHT)
        ids = torch.tensor([result["tokenizer"](PROBE).input_ids])
        with torch.no_grad():
            logits = result["model"].eval()(input_ids=ids).logits
        runs[name] = {"out": out, "losses": result["losses"], "final_dir": result["final_dir"], "ids": ids,
                      "logits": logits}
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [DEEPSPEED, FSDP], ids=["deepspeed", "fsdp"])
def test_run_sh_pretrains_with_eval_and_writes_a_checkpoint(recipe, tmp_path):
    out = tmp_path / "out"
    proc = run_script(recipe / "run.sh", f"--output_dir={out}", "--max_steps=30", "--eval_every=15",
                      f"--eval_data_path={SHARDS / 'shard-00003.jsonl.zst'}", *FAST)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_metrics(out)
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.5, losses  # from ln(2048) = 7.6 down
    assert len(evals) == 3 and evals[-1] < evals[0] - 1.0, evals  # before, at step 15, at the end
    assert all(k in r for r in rows if "loss" in r for k in ("tokens_per_s", "tokens_per_s_per_gpu", "grad_norm", "lr"))
    assert "tok/s/gpu" in proc.stdout and "MFLOPs/token" in proc.stdout
    final = out / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == 2048
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    from safetensors.torch import load_file

    assert config["dtype"] == "float32"  # the training dtype on CPU (bf16 on GPUs: test_checkpoint.py)
    assert {t.dtype for t in load_file(final / "model.safetensors").values()} == {torch.float32}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECIPES))
def test_final_checkpoint_reproduces_the_trained_model(name, straight_runs):
    from transformers import AutoModelForCausalLM

    run = straight_runs[name]
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(run["final_dir"]).eval()(input_ids=run["ids"]).logits
    torch.testing.assert_close(reloaded, run["logits"], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_deepspeed_and_fsdp_compute_the_same_steps(straight_runs):
    """Same seed, same init, same windows: ZeRO-1 and FSDP2 are two ways of taking the same optimizer steps."""
    ds, fsdp = straight_runs["deepspeed"]["losses"], straight_runs["fsdp"]["losses"]
    assert len(ds) == 6 and fsdp == pytest.approx(ds, abs=1e-4)
    assert ds[-1] < ds[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECIPES))
def test_resume_gives_the_same_next_steps(name, straight_runs, tmp_path):
    """Interrupted after step 3 (a copy of the straight run without its step-6 checkpoint) and resumed, the run
    continues with the losses of the uninterrupted one; a half-written checkpoint is never picked up."""
    out = tmp_path / "out"
    shutil.copytree(straight_runs[name]["out"], out)  # the shared run's folder stays as it was
    checkpoints = out / "checkpoints"
    shutil.rmtree(checkpoints / "step_00000006")
    (checkpoints / ".step_00000009.tmp").mkdir()  # what a crash while saving step 9 would leave
    resumed = run_main(RECIPES[name], out, *STRAIGHT, "--resume")
    assert resumed["steps"] == 3
    assert resumed["losses"] == pytest.approx(straight_runs[name]["losses"][3:], abs=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(os.cpu_count() < 2, reason="two processes need two cores")
def test_two_processes_deepspeed_launcher_and_torchrun_agree(tmp_path):
    from common.runtime import free_port

    losses = {}
    one_document = tmp_path / "eval.jsonl"  # rank 1 reads no eval document, yet joins every sharded forward
    one_document.write_text(json.dumps({"text": "The river runs to the sea. " * 40}) + "\n")
    for name, recipe in (("deepspeed", DEEPSPEED), ("fsdp", FSDP)):
        out, port = tmp_path / name, free_port()
        proc = run_script(recipe / "run.sh", f"--output_dir={out}", "--max_steps=3", "--batch_size=4",
                          "--document_mask", f"--eval_data_path={one_document}", "--eval_batches=2", *FAST,
                          env_extra={"NGPU": "2", "MASTER_PORT": str(port)}, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        # no rank maps DeepSpeed's CPU shared-memory all-reduce (69 MB of /dev/shm each, never removed by DeepSpeed)
        assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
        assert ("deepspeed launcher" if name == "deepspeed" else "torchrun") + ", 2 processes" in proc.stdout
        assert "2,048 tokens (batch 4 x accum 1 x 2 ranks)" in proc.stdout
        losses[name] = [r["loss"] for r in read_metrics(out) if "loss" in r]
        evals = [r["eval_loss"] for r in read_metrics(out) if "eval_loss" in r]
        assert len(evals) == 2 and all(math.isfinite(x) for x in evals), evals
    assert len(losses["fsdp"]) == 3 and all(math.isfinite(x) for x in losses["fsdp"])
    assert losses["fsdp"] == pytest.approx(losses["deepspeed"], abs=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(os.cpu_count() < 2, reason="two processes need two cores")
def test_tensor_parallel_over_two_processes_takes_the_fsdp_steps(straight_runs, tmp_path):
    """--tp=2: each rank holds half of every attention and MLP matrix (q/k/v/gate/up by rows, o/down by columns,
    the embedding by vocabulary), yet takes the one-process FSDP run's steps on the same windows, and final/ is the
    same whole checkpoint (measured: weights within 1e-5 of the one-process run)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint import FileSystemReader

    from common.runtime import free_port

    out = tmp_path / "out"
    proc = run_script(FSDP / "run.sh", f"--output_dir={out}", *FAST, *STRAIGHT, "--tp=2",
                      env_extra={"NGPU": "2", "MASTER_PORT": str(free_port())})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "over 1 rank(s) x tensor parallel 2 = 2 process(es)" in proc.stdout
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert losses == pytest.approx(straight_runs["fsdp"]["losses"], abs=1e-5)
    shards = FileSystemReader(str(out / "checkpoints" / "step_00000006")).read_metadata().state_dict_metadata
    chunks = {name: sorted(tuple(c.sizes) for c in shards[f"model.model.{name}.weight"].chunks)
              for name in ("layers.0.self_attn.q_proj", "layers.0.mlp.down_proj", "embed_tokens", "norm")}
    assert chunks == {"layers.0.self_attn.q_proj": [(128, 256)] * 2, "layers.0.mlp.down_proj": [(256, 384)] * 2,
                      "embed_tokens": [(1024, 256)] * 2, "norm": [(256,)]}
    split = load_file(out / "final" / "model.safetensors")
    whole = load_file(straight_runs["fsdp"]["final_dir"] / "model.safetensors")
    assert split.keys() == whole.keys()
    assert max(float((split[k] - whole[k]).abs().max()) for k in whole) < 1e-4


@pytest.mark.slow
@pytest.mark.skipif(os.cpu_count() < 2, reason="two processes need two cores")
def test_raw_files_to_a_pretrained_checkpoint(tmp_path):
    """The README's path: raw files -> shards -> a new tokenizer -> a token file -> pretraining on it, with both
    recipes in one process (two processes: test_two_processes_deepspeed_launcher_and_torchrun_agree; a token file's
    windows split over ranks: tests/common/test_pretrain_data.py)."""
    shards, tok, tokens = tmp_path / "shards", tmp_path / "tok", tmp_path / "tokens.bin"
    steps = [(SCRIPTS / "shard_corpus.py", "--inputs", str(REPO / "data" / "pretrain" / "raw"), "--out_dir",
              str(shards), "--max_lines", "300", "--workers", "2"),
             (SCRIPTS / "train_tokenizer.py", "--inputs", str(shards), "--out_dir", str(tok), "--vocab_size", "1000"),
             (SCRIPTS / "pretokenize.py", f"--data_path={shards}", f"--tokenizer_path={tok}", f"--out={tokens}")]
    for script, *args in steps:
        proc = run_script(script, *args)
        assert proc.returncode == 0, (script.name, proc.stdout[-2000:] + proc.stderr[-2000:])
    assert len(json.loads((shards / "manifest.json").read_text())["shards"]) >= 5
    for recipe in (DEEPSPEED, FSDP):
        out = tmp_path / recipe.name
        proc = run_script(recipe / "run.sh", f"--output_dir={out}", f"--tokenizer_path={tok}", f"--data_path={tokens}",
                          "--max_steps=20", "--batch_size=8", *FAST)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "token file" in proc.stdout and "single process" in proc.stdout
        losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
        assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 1.0, losses
        assert json.loads((out / "final" / "config.json").read_text())["vocab_size"] == 1024  # 1000 rounded to 64s


@pytest.mark.slow
def test_merged_tokenizer_grows_the_vocabulary_for_continued_pretraining(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    zh, merged = tmp_path / "zh", tmp_path / "merged"
    wudao_zh = REPO / "data" / "pretrain" / "raw" / "wudao_zh.json"
    for script, *args in [(SCRIPTS / "train_tokenizer.py", "--inputs", str(wudao_zh),
                           "--out_dir", str(zh), "--vocab_size", "1500", "--normalization", "identity"),
                          (SCRIPTS / "merge_tokenizer.py", "--base_tokenizer", str(REPO / "common" / "tiny_llama"),
                           "--add_tokenizer", str(zh), "--out_dir", str(merged))]:
        proc = run_script(script, *args)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    n = len(AutoTokenizer.from_pretrained(merged))
    assert n > 2048
    out = tmp_path / "out"
    proc = run_script(FSDP / "run.sh", f"--output_dir={out}", "--init_from=tiny", f"--tokenizer_path={merged}",
                      "--max_steps=3", *FAST)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{n - 2048} new token rows at the mean embedding" in proc.stdout
    weights = load_file(out / "final" / "model.safetensors")
    assert weights["model.embed_tokens.weight"].shape[0] == n and weights["lm_head.weight"].shape[0] == n


def test_grow_vocabulary_starts_new_rows_at_the_mean(tiny_dir):
    from transformers import AutoModelForCausalLM

    from common.model import grow_vocabulary

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    before = model.get_input_embeddings().weight.detach().clone()
    assert grow_vocabulary(model, 2048) == 0 and grow_vocabulary(model, 2100) == 52
    after = model.get_input_embeddings().weight
    assert torch.equal(after[:2048], before)
    torch.testing.assert_close(after[2048:], before.mean(0).expand(52, -1))
    assert model.get_output_embeddings().weight.shape[0] == 2100 and model.config.vocab_size == 2100


@pytest.mark.slow
def test_zero3_trains_and_grows_the_vocabulary_at_the_mean_row(tmp_path, tiny_dir):
    """Under ZeRO-3 a partitioned weight's own shape is (0,): the vocabulary is counted from its whole shape, so the
    loss stays finite and falls, and a larger tokenizer's new input rows start at the mean of init_from's rows (no
    weight decay, and tokens that never occur get no update, so they are still there in final/)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    grown = tmp_path / "grown"
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    tokenizer.add_tokens([f"<unused_{i}>" for i in range(40)])
    tokenizer.save_pretrained(grown)
    out = tmp_path / "out"
    proc = run_script(DEEPSPEED / "run.sh", f"--output_dir={out}", "--zero_stage=3", "--init_from=tiny",
                      f"--tokenizer_path={grown}", "--max_steps=6", "--seq_len=64", "--batch_size=4",
                      "--weight_decay=0", "--num_workers=0", *FAST)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "40 new token rows at the mean embedding" in proc.stdout
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses), losses
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses
    before = load_file(tiny_dir / "model.safetensors")["model.embed_tokens.weight"]
    after = load_file(out / "final" / "model.safetensors")
    assert after["model.embed_tokens.weight"].shape[0] == after["lm_head.weight"].shape[0] == 2088
    expected = before.mean(0).expand(40, -1)
    torch.testing.assert_close(after["model.embed_tokens.weight"][2048:], expected, atol=1e-6, rtol=0)
