"""common/checkpoint.py and the process-group decisions in common/runtime.py: a checkpoint folder appears whole or not
at all, keep_last prunes the oldest, the latest is the highest step, trainer states load with weights_only=True and
a tampered one never runs, each rank resumes its own RNG streams, every rank resumes the checkpoint rank 0 picked (or
all stop with one line), the save timeout and the backend choice."""
import json
import os
import random
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO


class WritesAFile:
    """What a hostile trainer_state.pt holds: unpickling it would create `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def draws() -> list:
    return [random.random(), float(np.random.rand()), torch.rand(3).tolist()]


def tiny_optimizer():
    from common.optim import warmup_cosine

    param = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.full((4,), 0.5)
    optimizer.step()
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(10, 2))


def test_resume_restores_optimizer_scheduler_and_rng_through_a_weights_only_load(tmp_path):
    from common.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint

    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    optimizer, scheduler = tiny_optimizer()
    optimizer.step()
    scheduler.step()
    saved = save_checkpoint(tmp_path, 3, lambda folder: None, optimizer, scheduler, keep_last=2)
    expected = draws()
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    fresh, fresh_scheduler = tiny_optimizer()
    assert latest_checkpoint(tmp_path) == saved
    assert load_trainer_state(saved, fresh, fresh_scheduler) == 3
    assert draws() == expected
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()


def overflowed_scaler(overflows: int, clean_steps: int):
    """An fp16-style GradScaler (on CPU, init scale 2^16, growth every 3 clean steps) after `overflows` steps whose
    gradients were inf, then `clean_steps` finite ones: the scale halves on each overflow."""
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3)
    for step in range(overflows + clean_steps):
        optimizer.zero_grad()
        factor = float("inf") if step < overflows else 1.0
        scaler.scale((weight * factor).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    return optimizer, scaler


def test_an_fp16_loss_scale_is_saved_and_resumed(tmp_path):
    """The GradScaler of an fp16 run (GPUs without bf16) comes back with its scale and growth count: a fresh one
    would start at 2^16 and skip the resumed run's first steps as overflows. bf16/fp32 checkpoints carry none."""
    from common.checkpoint import load_trainer_state, save_checkpoint

    optimizer, scaler = overflowed_scaler(overflows=5, clean_steps=2)
    assert scaler.get_scale() == 2.0**11 and scaler.state_dict()["_growth_tracker"] == 2
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    saved = save_checkpoint(tmp_path, 7, lambda folder: None, optimizer, scheduler, keep_last=2, scaler=scaler)
    fresh_optimizer, fresh = overflowed_scaler(overflows=0, clean_steps=0)
    assert load_trainer_state(saved, fresh_optimizer, scheduler, fresh) == 7
    assert fresh.state_dict() == scaler.state_dict()
    disabled = torch.amp.GradScaler("cpu", enabled=False)  # bf16 / fp32: nothing to save
    plain = save_checkpoint(tmp_path, 8, lambda folder: None, optimizer, scheduler, keep_last=2, scaler=disabled)
    _, fresh = overflowed_scaler(overflows=0, clean_steps=0)
    load_trainer_state(plain, fresh_optimizer, scheduler, fresh)
    assert fresh.get_scale() == 2.0**16


def test_atomic_write_dir_leaves_no_partial_folder_when_the_write_fails(tmp_path):
    from common.checkpoint import atomic_write_dir

    target = tmp_path / "checkpoints" / "step_00000002"
    atomic_write_dir(target, lambda folder: (folder / "weights").write_text("old"))

    def fails_halfway(folder):
        (folder / "weights").write_text("new, half written")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write_dir(target, fails_halfway)
    assert (target / "weights").read_text() == "old"  # the complete earlier folder is untouched
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write_dir(tmp_path / "checkpoints" / "step_00000004", fails_halfway)
    assert not (tmp_path / "checkpoints" / "step_00000004").exists()
    atomic_write_dir(target, lambda folder: (folder / "weights").write_text("new"))
    assert (target / "weights").read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["step_00000002"]  # no temporary folder left behind


def test_keep_last_prunes_the_oldest_and_latest_is_the_highest_step(tmp_path):
    from common.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint

    assert latest_checkpoint(tmp_path) is None
    optimizer, scheduler = tiny_optimizer()
    for step in (5, 10, 100, 20):  # saved out of order: the latest is the highest step, not the newest file
        save_checkpoint(tmp_path, step, lambda folder: None, optimizer, scheduler, keep_last=0)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000005", "step_00000010", "step_00000020",
                                                            "step_00000100"]
    (tmp_path / "checkpoints" / "step_00000200").mkdir()  # no trainer_state.pt: not a complete checkpoint
    assert latest_checkpoint(tmp_path).name == "step_00000100"
    save_checkpoint(tmp_path, 110, lambda folder: None, optimizer, scheduler, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000100", "step_00000110"]
    assert latest_checkpoint(tmp_path).name == "step_00000110"


def test_a_tampered_trainer_state_is_refused_in_one_line_and_never_runs(tmp_path):
    from common.checkpoint import STATE_FILE

    folder = tmp_path / "checkpoints" / "step_00000003"
    folder.mkdir(parents=True)
    marker = tmp_path / "payload-ran"
    torch.save({"step": 3, "optimizer": WritesAFile(marker)}, folder / STATE_FILE)
    code = ("import sys, torch; from common.checkpoint import load_trainer_state; from common.config import "
            "exit_on_user_error\nwith exit_on_user_error():\n    load_trainer_state(sys.argv[1], None, None)")
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], check=False, capture_output=True, text=True,
                          timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    expected = (f"error: --resume: {folder / STATE_FILE}: refused, it is not a trainer state these recipes write and "
                "loading it could run code (Unsupported global: GLOBAL io.open)")
    assert proc.stderr.strip().splitlines() == [expected]
    assert not marker.exists()


TWO_RANKS = """
import json, random, sys
import numpy as np, torch
from common.checkpoint import load_trainer_state, resume_checkpoint, save_checkpoint
from common.config import exit_on_user_error
from common.optim import warmup_cosine
from common.runtime import cleanup, setup_runtime

mode, out = sys.argv[1], sys.argv[2]
rt = setup_runtime(seed=0)
if mode == "missing":  # each rank looks in its own output_dir, as on a node without the shared disk
    with exit_on_user_error():
        resume_checkpoint(f"{out}/rank{rt.rank}")
param = torch.nn.Parameter(torch.ones(2))
optimizer = torch.optim.AdamW([param])
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(10, 1))
torch.manual_seed(100 + rt.rank), random.seed(100 + rt.rank), np.random.seed(100 + rt.rank)
save_checkpoint(out, 1, print, optimizer, scheduler, keep_last=1)
expected = [random.random(), float(np.random.rand()), torch.rand(3).tolist()]
torch.manual_seed(0), random.seed(0), np.random.seed(0)
load_trainer_state(resume_checkpoint(out), optimizer, scheduler)
print(json.dumps({"rank": rt.rank, "expected": expected,
                  "restored": [random.random(), float(np.random.rand()), torch.rand(3).tolist()]}))
cleanup(rt)
"""


def run_two_ranks(mode: str, out: Path) -> list[subprocess.CompletedProcess]:
    from common.runtime import free_port

    env = {**os.environ, "PYTHONPATH": str(REPO), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [subprocess.Popen([sys.executable, "-c", TWO_RANKS, mode, str(out)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=REPO,
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}) for rank in (0, 1)]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)  # a hang fails here
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return results


@pytest.mark.skipif(os.cpu_count() < 2, reason="two processes need two cores")
def test_each_of_two_ranks_resumes_its_own_rng_streams(tmp_path):
    ranks = run_two_ranks("rng", tmp_path)
    assert all(r.returncode == 0 for r in ranks), [r.stderr[-2000:] for r in ranks]
    rows = [json.loads(r.stdout.strip().splitlines()[-1]) for r in ranks]
    assert [row["rank"] for row in rows] == [0, 1]
    assert all(row["restored"] == row["expected"] for row in rows)
    assert rows[0]["expected"] != rows[1]["expected"]  # two streams, not rank 0's on both


@pytest.mark.skipif(os.cpu_count() < 2, reason="two processes need two cores")
def test_a_rank_that_cannot_see_rank_0s_checkpoint_stops_every_rank_in_one_line(tmp_path):
    chosen = tmp_path / "rank0" / "checkpoints" / "step_00000003"
    chosen.mkdir(parents=True)
    torch.save({"step": 3}, chosen / "trainer_state.pt")
    (tmp_path / "rank1").mkdir()  # rank 1's disk: no checkpoint
    ranks = run_two_ranks("missing", tmp_path)
    for rank, proc in enumerate(ranks):
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        line = proc.stderr.strip().splitlines()[-1]
        folder = tmp_path / f"rank{rank}" / "checkpoints" / "step_00000003"
        assert line.startswith(f"error: --resume: {folder} is missing on rank 1 ("), line
        assert line.endswith("only rank 0 writes checkpoints, so --output_dir must be on a file system all nodes share")


def test_ranks_wait_for_a_save_long_enough_for_its_size():
    from common.runtime import SAVE_TIMEOUT_FLOOR, save_timeout

    assert save_timeout(20_000_000) == SAVE_TIMEOUT_FLOOR == timedelta(minutes=30)  # a LoRA adapter and its AdamW
    bf16_65b = 65_000_000_000 * 2  # rank 0 writing a 65B model's final/ in bf16
    assert save_timeout(bf16_65b) == timedelta(seconds=2600) > timedelta(minutes=10)  # NCCL's default would fire
    assert save_timeout(bf16_65b, write_bytes_per_s=1e9) == SAVE_TIMEOUT_FLOOR


def test_cpu_offload_on_gpus_adds_a_gloo_backend_beside_nccl():
    from common.runtime import process_group_backend

    assert process_group_backend("cpu") == process_group_backend("cpu", cpu_offload=True) == "gloo"
    assert process_group_backend("cuda") == "nccl"
    assert process_group_backend("cuda", cpu_offload=True) == "cuda:nccl,cpu:gloo"


def test_a_final_model_is_written_in_the_training_dtype():
    """pretrain/fsdp keeps fp32 masters; its final/ holds bf16 weights when it trains in bf16 (on CPU fp32: checked
    through the recipe in tests/recipes/test_pretrain.py)."""
    from common.checkpoint import cast_floating

    masters = {"model.embed_tokens.weight": torch.randn(8, 4), "model.rotary_emb.inv_freq": torch.rand(2),
               "step_ids": torch.arange(3)}
    expected = {k: v.to(torch.bfloat16) for k, v in masters.items() if v.is_floating_point()}
    final = cast_floating(dict(masters), torch.bfloat16)
    assert {k: v.dtype for k, v in final.items()} == {"model.embed_tokens.weight": torch.bfloat16,
                                                      "model.rotary_emb.inv_freq": torch.bfloat16,
                                                      "step_ids": torch.int64}
    assert all(torch.equal(final[k], v) for k, v in expected.items())
    assert torch.equal(final["step_ids"], torch.arange(3))


class Lines:
    """A logger stand-in that keeps what `info` was given."""

    def __init__(self):
        self.lines = []

    def info(self, text):
        self.lines.append(text)


def lora_model(seed: int):
    from common.model import add_lora, load_model, materialize_tiny_llama

    torch.manual_seed(seed)
    return add_lora(load_model(materialize_tiny_llama()), r=4, alpha=8, dropout=0.0, target_modules=["q_proj"])


def test_resume_adapter_training_restores_the_adapter_and_says_when_there_is_nothing(tmp_path):
    from peft import get_peft_model_state_dict

    from common.checkpoint import resume_adapter_training, save_checkpoint

    log = Lines()
    empty = lora_model(0)
    optimizer, scheduler = tiny_optimizer()
    assert resume_adapter_training(empty, optimizer, scheduler, tmp_path, torch.device("cpu"), log) == 0
    assert log.lines == [f"--resume: no checkpoint in {tmp_path / 'checkpoints'}, starting from step 0"]

    trained = lora_model(1)
    for name, param in trained.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the saved adapter differ from a fresh one
            param.data.fill_(0.5)
    saved = save_checkpoint(tmp_path, 4, trained.save_pretrained, optimizer, scheduler, keep_last=2)
    fresh = lora_model(2)
    fresh_optimizer, fresh_scheduler = tiny_optimizer()
    step = resume_adapter_training(fresh, fresh_optimizer, fresh_scheduler, tmp_path, torch.device("cpu"), log)
    assert step == 4 and log.lines[-1] == f"resumed from {saved} at step 4"
    expected, restored = get_peft_model_state_dict(trained), get_peft_model_state_dict(fresh)
    assert expected.keys() == restored.keys()
    assert all(torch.equal(expected[k], restored[k]) for k in expected)
