"""sft/full-ft-deepspeed-offload end to end on CPU with the tiny model: DeepSpeed ZeRO-2 with DeepSpeedCPUAdam
(the optimizer offloaded), ZeRO-3 with the weights offloaded too, checkpoints, resume and the deepspeed launcher."""
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, load_recipe, read_metrics, run_script

RECIPE = REPO / "sft" / "full-ft-deepspeed-offload"
full_ft = load_recipe(RECIPE)

# DeepSpeedCPUAdam is compiled with gcc on first use (60-90 s); share the build with run.sh's default location
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
FAST = ["--report_to=none", "--batch_size=8", "--grad_accum=1", "--lr=1e-3", "--log_every=1"]



def run_main(out, *args):
    return full_ft.main(full_ft.parse_config(full_ft.Config, [f"--output_dir={out}", *FAST, *args]))


def reference_grad_norm(micro_batches: list[list[int]]) -> float:
    """Gradient norm of the untrained tiny model on the mean loss over the trained tokens of all micro-batches,
    computed in plain PyTorch: what the recipe's first step must report whatever DeepSpeed does inside."""
    from common.data import build_sft_examples, collate_left_padded, read_records
    from common.losses import count_trained_tokens, token_loss_sum
    from common.model import load_model, load_tokenizer, resolve_model_path

    model_dir = resolve_model_path("tiny")
    tok = load_tokenizer(model_dir)
    examples, _ = build_sft_examples(read_records(REPO / "data" / "sft" / "train.jsonl"), tok, 1024)
    model = load_model(model_dir, "none")
    chunk = [collate_left_padded([examples[i] for i in idx], tok.pad_token_id) for idx in micro_batches]
    n_trained = sum(count_trained_tokens(b["labels"]) for b in chunk)
    for batch in chunk:
        labels = batch.pop("labels")
        (token_loss_sum(model(**batch).logits, labels) / n_trained).backward()
    return torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).item()


def reference_eval_loss() -> float:
    """Loss per trained token of the untrained tiny model over data/sft/eval.jsonl, one example at a time."""
    from common.data import build_sft_examples, collate_left_padded, read_records
    from common.losses import count_trained_tokens, token_loss_sum
    from common.model import load_model, load_tokenizer, resolve_model_path

    model_dir = resolve_model_path("tiny")
    tok = load_tokenizer(model_dir)
    examples, _ = build_sft_examples(read_records(REPO / "data" / "sft" / "eval.jsonl"), tok, 1024)
    model = load_model(model_dir, "none").eval()
    loss_sum = n_tokens = 0
    with torch.no_grad():
        for example in examples:
            batch = collate_left_padded([example], tok.pad_token_id)
            labels = batch.pop("labels")
            loss_sum += token_loss_sum(model(**batch).logits, labels).item()
            n_tokens += count_trained_tokens(labels)
    return loss_sum / n_tokens


def train_lengths() -> list[int]:
    from common.data import build_sft_examples, read_records
    from common.model import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path("tiny"))
    examples, _ = build_sft_examples(read_records(REPO / "data" / "sft" / "train.jsonl"), tok, 1024)
    return [len(e["input_ids"]) for e in examples]


@pytest.mark.slow
def test_run_sh_trains_with_cpu_adam_offload_and_writes_artifacts(tmp_path):
    out = tmp_path / "out"
    proc = run_script(RECIPE / "run.sh", f"--output_dir={out}", "--max_steps=12", "--batch_size=8", "--grad_accum=1",
                      "--eval_every=6")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "zero     stage 2, optimizer offloaded to CPU | DeepSpeedCPUAdam" in proc.stdout
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    evals = [r["eval_loss"] for r in read_metrics(out) if "eval_loss" in r]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses  # loss falls
    assert len(evals) == 3 and evals[-1] < evals[0]
    step_keys = ("step", "loss", "lr", "grad_norm", "tokens_per_s")
    assert all(k in r for r in read_metrics(out) if "loss" in r for k in step_keys)
    assert "step 12/12 | loss" in proc.stdout and "tok/s | mem" in proc.stdout
    final = out / "final"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (final / name).is_file(), name
    assert json.loads((final / "config.json").read_text())["dtype"] == "float32"  # fp32 weights from a CPU run
    assert json.loads((out / "config.json").read_text())["max_steps"] == 12
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_final_checkpoint_reloads_and_reproduces_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    from common.data import collate_left_padded
    from common.model import load_model, resolve_model_path

    result = run_main(tmp_path / "out", "--max_steps=3")
    tok = result["tokenizer"]
    texts = ("Reverse: a b c", "你好，世界")
    batch = collate_left_padded([{"input_ids": tok(t).input_ids} for t in texts], tok.pad_token_id)
    model = result["model"].eval()
    reloaded = AutoModelForCausalLM.from_pretrained(result["final_dir"], local_files_only=True).eval()
    untrained = load_model(resolve_model_path("tiny"), "none").eval()
    with torch.no_grad():
        in_memory, from_disk, before = model(**batch).logits, reloaded(**batch).logits, untrained(**batch).logits
    torch.testing.assert_close(from_disk, in_memory, atol=1e-6, rtol=0)
    assert (from_disk - before).abs().max() > 0.1  # every weight trained, so the comparison means something
    assert all(p.dtype == torch.float32 for p in reloaded.parameters())


@pytest.mark.slow
def test_step_gradient_is_the_mean_over_all_tokens_of_the_step(tmp_path):
    """DeepSpeed divides the loss by grad_accum inside backward; the recipe undoes it, so the gradient of a step
    of 3 micro-batches is that of the token mean over all of them (the logged norm is taken before clipping)."""
    from common.data import plan_batches

    run_main(tmp_path / "out", "--max_steps=1", "--batch_size=4", "--grad_accum=3", "--eval_data_path=")
    logged = [r["grad_norm"] for r in read_metrics(tmp_path / "out") if "grad_norm" in r][0]
    expected = reference_grad_norm(plan_batches(train_lengths(), 4, 42, 0, True)[:3])
    assert logged == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_zero3_with_offloaded_weights_matches_zero2_and_saves_whole_model(tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    args = ["--max_steps=4", "--save_every=4", "--eval_data_path="]
    zero2 = run_main(tmp_path / "z2", *args)
    zero3 = run_main(tmp_path / "z3", *args, "--zero_stage=3", "--offload_params")
    assert zero3["losses"] == pytest.approx(zero2["losses"], abs=1e-5)  # same maths, weights partitioned
    saved = load_file(zero3["final_dir"] / "model.safetensors")
    # the fp32 master weights DeepSpeed's zero_to_fp32 merges from the partitions equal the gathered final save
    masters = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "z3" / "checkpoints" / "step_00000004"))
    assert saved.keys() == masters.keys() and len(saved) == 39
    for name, tensor in saved.items():
        assert torch.equal(tensor, masters[name].contiguous()), name
    zero2_saved = load_file(zero2["final_dir"] / "model.safetensors")
    assert max((saved[k] - zero2_saved[k]).abs().max().item() for k in saved) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_resume_continues_exactly_and_ignores_half_written_checkpoints(tmp_path, zero_stage):
    args = ["--max_steps=6", "--save_every=3", "--eval_data_path=", f"--zero_stage={zero_stage}"]
    straight = run_main(tmp_path / "a", *args)
    run_main(tmp_path / "b", *args)
    checkpoints = tmp_path / "b" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000003", "step_00000006"]
    # the run "died" after step 3: drop step 6 and leave what a crash while saving step 9 would leave
    shutil.rmtree(checkpoints / "step_00000006")
    (checkpoints / ".step_00000009.tmp" / "global_step9").mkdir(parents=True)
    shutil.copytree(checkpoints / "step_00000003", checkpoints / "step_00000009",
                    ignore=shutil.ignore_patterns("trainer_state.pt"))
    resumed = run_main(tmp_path / "b", *args, "--resume")
    assert resumed["steps"] == 3
    assert resumed["losses"] == pytest.approx(straight["losses"][3:], abs=1e-6)


def nan_on_call(n, real):
    """A loss function that returns nan on its n-th call (the n-th micro-batch) and is `real` otherwise."""
    calls = {"count": 0}

    def loss(*args, **kwargs):
        calls["count"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["count"] == n else value
    return loss


@pytest.mark.slow
def test_nan_step_stops_before_its_update_or_is_skipped(tmp_path, monkeypatch):
    """--on_nan=stop raises before the last engine.step of the step; --on_nan=skip lets DeepSpeed drop the update
    (its overflow check sees the non-finite gradient norm) and training goes on with finite weights."""
    from common.losses import NonFiniteLoss, token_loss_sum

    args = ["--max_steps=4", "--eval_data_path="]
    monkeypatch.setattr(full_ft, "token_loss_sum", nan_on_call(3, token_loss_sum))
    with pytest.raises(NonFiniteLoss, match=r"step 3: loss nan, .*\(last checkpoint: .*step_00000002\)"):
        run_main(tmp_path / "stop", *args, "--save_every=2")
    monkeypatch.setattr(full_ft, "token_loss_sum", nan_on_call(3, token_loss_sum))
    result = run_main(tmp_path / "skip", *args, "--on_nan=skip")
    rows = [r for r in read_metrics(tmp_path / "skip") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 4]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert all(torch.isfinite(p).all() for p in result["model"].parameters())


def test_config_mistakes_are_clear(tmp_path):
    from common.config import UserError

    with pytest.raises(UserError, match="--offload_params needs --zero_stage=3"):
        run_main(tmp_path / "a", "--offload_params")
    ds_config = tmp_path / "ds.json"
    ds_config.write_text(json.dumps({"gradient_clipping": 0.5, "zero_optimization": {"overlap_comm": False}}))
    with pytest.raises(UserError, match=r"'gradient_clipping' is 0.5 but --max_grad_norm gives 1.0"):
        run_main(tmp_path / "b", f"--ds_config={ds_config}")
    ds_config.write_text(json.dumps({"optimizer": {"type": "AdamW"}}))
    with pytest.raises(UserError, match="remove 'optimizer'; train.py builds it"):
        run_main(tmp_path / "c", f"--ds_config={ds_config}")


@pytest.mark.slow
@pytest.mark.skipif(os.cpu_count() < 2, reason="two processes need two cores")
@pytest.mark.parametrize("zero_args", [["--zero_stage=2"], ["--zero_stage=3", "--offload_params"]],
                         ids=["zero2", "zero3"])
def test_two_processes_under_the_deepspeed_launcher(tmp_path, zero_args):
    """ZeRO averages gradients over ranks; the recipe makes the step's gradient the token mean over both ranks'
    micro-batches. The eval set (5 batches of 8) splits 3/2 over the ranks; under ZeRO-3 a rank that ran out must
    still join every forward, and each example counts once."""
    from common.data import plan_batches
    from common.runtime import free_port

    out = tmp_path / "out"
    proc = run_script(RECIPE / "run.sh", f"--output_dir={out}", "--max_steps=2", "--report_to=none", "--batch_size=8",
                      "--grad_accum=2", *zero_args, env_extra={"NGPU": "2", "MASTER_PORT": str(free_port())})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "deepspeed launcher, 2 processes" in proc.stdout and "CPU, 1 threads" in proc.stdout
    assert (out / "final" / "model.safetensors").is_file()
    rows = read_metrics(out)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    both_ranks = [b for rank in (0, 1) for b in plan_batches(train_lengths(), 8, 42, 0, True, rank, 2)[:2]]
    first_step = next(r for r in rows if "grad_norm" in r)
    expected_norm = reference_grad_norm(both_ranks)
    assert first_step["step"] == 1 and first_step["grad_norm"] == pytest.approx(expected_norm, rel=1e-5)
    assert rows[0]["step"] == 0 and rows[0]["eval_loss"] == pytest.approx(reference_eval_loss(), rel=1e-5)
