"""bench/gpu_smoke.sh on a machine without a GPU: the dry run's plan (every recipe, every part, limits within 560 s),
the runner's rows for a failing, hanging, blocked and uncarried step, the summary table from a run's metrics.jsonl,
the MFU formula against a hand computation, and the random NF4 QLoRA build layer by layer at a 2-layer tiny shape."""
import json
import math
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import gpu_models  # noqa: E402
import gpu_smoke  # noqa: E402

SMOKE_LIMIT_S = 560  # the device call's limit the smoke is sized for
WHEEL_INSTALL_S = 45 + 10  # gpu_smoke.sh's timeouts on the wheel install and the versions print


def test_dry_run_lists_every_recipe_and_part_within_560_s_and_runs_nothing(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "SMOKE_WORK": str(tmp_path / "work")}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_smoke.sh"), "--dry-run"], capture_output=True,
                          text=True, timeout=60, env={**env, "PYTHON": sys.executable}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = re.findall(r"^  \[lane \d\] (.+) \| part (\w+) \| limit (\d+) s", proc.stdout, re.M)
    commands = re.findall(r"^      \$ (.+)$", proc.stdout, re.M)
    assert len(steps) == len(commands) == 22
    names = {name: part for name, part, _ in steps}
    for folder in ("sft/qlora", "sft/full-ft-deepspeed-offload", "sft/fsdp-qlora", "sft/peft-int4", "cls/qlora",
                   "cls/full-ft-deepspeed-offload", "cls/peft-int4", "cls/reward-qlora", "pretrain/deepspeed",
                   "pretrain/fsdp"):
        assert names[folder] == "a"
        assert any(f"bash {folder}/run.sh --max_steps=4 " in c for c in commands), folder
    assert names["pretrain/deepspeed --zero_stage=3"] == "a"
    assert sum(c.endswith("--zero_stage=3") for c in commands) == 1
    assert names["sft/qlora --liger=off"] == names["sft/qlora --packing"] == "a"  # Liger on/off and packing on CUDA
    assert sorted(set(names.values())) == ["a", "a2", "b", "c", "d"]
    assert any("LLAMA_RECIPES_TEST_DEVICE=cuda" in c and "tests/common/test_data_padding.py" in c for c in commands)
    assert any("bench/peers.py --family=sft" in c and "--rounds=2" in c and "--seq_len=2048" in c for c in commands)
    assert any("pretrain/fsdp/run.sh --init_from=" in c and "llama3.2-1b" in c for c in commands)
    assert any("--shape=llama3-8b" in c and "--checkpointing=true,false" in c for c in commands)
    assert any("--shape=65b" in c for c in commands)
    # a phase lasts at most its longest lane; the phases' bounds and the wheel install fit the 560 s
    bounds = [int(b) for b in re.findall(r"^phase \d+ \(at most (\d+) s", proc.stdout, re.M)]
    total = int(re.search(r"at most (\d+) s in all", proc.stdout)[1])
    assert sum(bounds) == total and total + WHEEL_INSTALL_S <= SMOKE_LIMIT_S
    assert sum(int(limit) for *_, limit in steps) > total  # the lanes of phase 1 really overlap
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_only_keeps_the_parts_asked_for_and_what_they_need(tmp_path):
    plan = gpu_smoke.build_plan(tmp_path)
    assert gpu_smoke.plan_bound(plan) + WHEEL_INSTALL_S <= SMOKE_LIMIT_S
    only_b = [s.name for phase in gpu_smoke.select(plan, {"b"}) for lane in phase for s in lane]
    assert only_b == ["make 1B (random, bf16, on the GPU)", "long SFT data (2,048 tokens)",
                      "peers 1B: sft/qlora vs Trainer + peft", "pretrain/fsdp 1B full training"]
    only_c = gpu_smoke.select(plan, {"c"})
    assert [[[s.part for s in lane] for lane in phase] for phase in only_c] == [[["c"]]]
    with pytest.raises(SystemExit):
        gpu_smoke.main(["--dry-run", "--only=a,z"])


def test_runner_rows_for_failing_hanging_blocked_and_uncarried_steps():
    py = sys.executable
    plan = [[[gpu_smoke.Step("boom", "a", 20, [py, "-c", "print('working'); raise ValueError('boom')"]),
              gpu_smoke.Step("hang", "a", 1, [py, "-c", "import time; print('waiting', flush=True); time.sleep(30)"]),
              gpu_smoke.Step("after hang", "a", 20, [py, "-c", "print(1)"], after=("hang",))],
             [gpu_smoke.Step("absent", "a", 20, [py, "-c", "print(1)"], needs=("json", "no_such_package_xyz")),
              gpu_smoke.Step("fine", "a", 20, [py, "-c", "print('done')"])]]]
    rows = {r.step: r for r in gpu_smoke.Runner(budget_s=60).run(plan)}
    assert list(rows) == ["boom", "hang", "after hang", "absent", "fine"]
    assert (rows["boom"].status, rows["boom"].rc, rows["boom"].note) == ("failed", 1, "ValueError: boom")
    assert (rows["hang"].status, rows["hang"].rc) == ("timeout", 124) and rows["hang"].seconds < 10
    assert rows["hang"].note == "killed after 1 s; its last line: waiting"
    assert (rows["after hang"].status, rows["after hang"].note) == ("skipped", "needs hang")
    assert (rows["absent"].status, rows["absent"].rc) == ("not carried", None)
    assert rows["absent"].note == "no_such_package_xyz not installed"
    assert (rows["fine"].status, rows["fine"].rc) == ("ok", 0)
    out_of_time = gpu_smoke.Runner(budget_s=0).run([[[gpu_smoke.Step("late", "d", 60, [py, "-c", "1"])]]])
    assert out_of_time[0].status == "skipped" and out_of_time[0].note.startswith("no time left")


def write_metrics(run_dir, rows):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_recipe_rows_and_summary_table_from_metrics(tmp_path):
    write_metrics(tmp_path / "run", [
        {"step": 0, "eval_loss": 7.8},
        {"step": 1, "loss": 7.65, "mem_gb": 0.31, "mem_reserved_gb": 0.52},
        {"step": 2, "loss": 7.5, "mem_gb": 0.33, "mem_reserved_gb": 0.5},
        {"step": 3, "loss": 7.25, "mem_gb": 0.32, "mem_reserved_gb": 0.54}])
    step = gpu_smoke.Step("sft/qlora", "a", 40, ["bash"], "recipe", run_dir=str(tmp_path / "run"))
    ok = gpu_smoke.step_rows(step, gpu_smoke.Row("sft/qlora", "ok", 0, 12.4), "")
    uncarried = gpu_smoke.Row("sft/peft-int4", "not carried", note="gptqmodel not installed")
    failed_step = gpu_smoke.Step("cls/qlora", "a", 40, ["bash"], "recipe", run_dir=str(tmp_path / "none"))
    failed = gpu_smoke.step_rows(failed_step, gpu_smoke.Row("cls/qlora", "failed", 1, 3.0, note="OSError: x"), "")
    assert gpu_smoke.summary_table(ok + [uncarried] + failed).splitlines()[2:] == [
        "| sft/qlora | ok | 0 | 12 | 7.6500 -> 7.2500 | 0.33 / 0.54 | - |  |",
        "| sft/peft-int4 | not carried | - | - | - | - | - | gptqmodel not installed |",
        "| cls/qlora | failed | 1 | 3 | - | - | - | OSError: x; no step in metrics.jsonl |"]
    assert gpu_smoke.last_error_line("Traceback\n  File x\nRuntimeError: CUDA error: a | b\n\nbye\n") == \
        "RuntimeError: CUDA error: a / b"


def test_mfu_formula_against_a_hand_computation(tmp_path):
    shape = json.loads(gpu_smoke.CONFIG_1B.read_text())
    # Llama-3.2-1B: q, k, v, o + gate, up, down per layer; 16 layers; the (tied) head 2048 x 128256 multiplies too
    per_layer = 2048 * 2048 + 2 * 2048 * 512 + 2048 * 2048 + 3 * 2048 * 8192
    by_hand = 6 * (16 * per_layer + 2048 * 128256) + 12 * 16 * 2048 * 2048
    assert by_hand == 8_219_787_264
    assert gpu_smoke.train_flops_per_token(shape, 2048) == by_hand
    from transformers import LlamaConfig

    from common.pretrain_data import flops_per_token  # the recipes' own MFU: the same formula
    assert flops_per_token(LlamaConfig(**shape), 2048) == by_hand
    assert gpu_smoke.mfu(40_000, by_hand, 989e12) == pytest.approx(40_000 * 8_219_787_264 / 989e12)
    speeds = ((1, 100), (2, 200), (3, 30_000), (4, 50_000))  # steps 1 and 2 are warm-up: left out
    write_metrics(tmp_path / "run", [{"step": s, "loss": 12.0 - s, "tokens_per_s_per_gpu": t, "mfu": 0.3,
                                      "mem_gb": 20.0, "mem_reserved_gb": 25.5} for s, t in speeds])
    fields = gpu_smoke.pretrain_mfu_fields(tmp_path / "run", gpu_smoke.CONFIG_1B)
    assert (fields["tok_s"], fields["loss"], fields["memory"]) == ("40,000", "11.0000 -> 8.0000", "20.00 / 25.50")
    assert fields["note"].startswith("MFU 33.2% of 989 TFLOP/s nominal, 41.2% of 798 measured; 8.22 GFLOP/token")
    assert fields["note"].endswith("the recipe's own mfu 30.0%")


def test_qlora_rows_from_result_lines():
    result = {"shape": "65b", "checkpointing": True, "seq_len": 2048, "steps": 2, "tok_s": 1234.5, "loss_first": 10.5,
              "loss_last": 10.25, "peak_alloc_gb": 41.0, "peak_reserved_gb": 44.5, "weights_gb": 36.0,
              "estimate_gb": 40.125}
    step = gpu_smoke.Step("QLoRA 65B", "d", 60, ["python"], "qlora")
    rows = gpu_smoke.step_rows(step, gpu_smoke.Row("QLoRA 65B", "ok", 0, 50.0),
                               "model ...\nRESULT " + json.dumps(result) + "\n")
    assert gpu_smoke.summary_table(rows).splitlines()[2] == (
        "| QLoRA 65B, checkpointing on | ok | 0 | 50 | 10.5000 -> 10.2500 | 41.00 / 44.50 | 1,234 | estimate 40.12 GB "
        "(tools/estimate_memory.py); the promise: 2 x 24 GB, split evenly 20.5 GB a card + context |")
    # out of memory in the second setting: the first setting's row stays, then the failure's
    crashed = gpu_smoke.Row("QLoRA 65B", "failed", 1, 70.0, note="torch.OutOfMemoryError: CUDA out of memory")
    rows = gpu_smoke.step_rows(step, crashed, "RESULT " + json.dumps(result) + "\nOutOfMemoryError\n")
    assert [(r.step, r.status, r.tok_s) for r in rows] == [("QLoRA 65B, checkpointing on", "failed", "1,234"),
                                                           ("QLoRA 65B", "failed", "-")]
    assert rows[1].note == "torch.OutOfMemoryError: CUDA out of memory"


def test_random_nf4_qlora_built_layer_by_layer_at_a_two_layer_tiny_shape():
    """On CPU (bitsandbytes' CPU path): every projection quantized from meta, nothing left on meta, and QLoRA steps
    with checkpointing on and off give finite losses and the estimator's figure."""
    import bitsandbytes as bnb
    import torch

    tiny = json.loads((REPO / "common" / "tiny_llama" / "config.json").read_text())
    shape = {**tiny, "num_hidden_layers": 2}
    model = gpu_models.random_4bit_model(gpu_models.llama_config(shape), torch.device("cpu"), torch.float32)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7 and all(m.weight.quant_state is not None for m in quantized)
    assert not any(p.is_meta for p in model.parameters())
    gpu_models.SHAPES["tiny-2-layers"] = shape
    results = gpu_models.qlora_measure("tiny-2-layers", 16, 1, [True, False])
    assert [r["checkpointing"] for r in results] == [True, False]
    for r in results:
        assert math.isfinite(r["loss_first"]) and math.isfinite(r["loss_last"]) and r["tok_s"] > 0
        assert r["loss_first"] == pytest.approx(math.log(2048), rel=0.05)  # random weights: about uniform
        assert 0.8 < r["estimate_gb"] < 1.0  # CUDA context + a few MB of a 2-layer tiny model


def test_random_model_folder_and_long_sft_records(tmp_path):
    """make-1b's folder (here at the tiny shape, on CPU) loads as a checkpoint with the tiny tokenizer; long-sft's
    records reach the sequence length asked for."""
    from transformers import AutoModelForCausalLM

    from common.data import build_sft_examples, read_records
    from common.model import load_tokenizer, resolve_model_path

    n = gpu_models.make_random_model("tiny", tmp_path / "model", "cpu")
    folder = resolve_model_path(str(tmp_path / "model"))
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) == n and not (tmp_path / "model.tmp").exists()
    tokenizer = load_tokenizer(folder)
    assert gpu_models.make_long_sft(tmp_path / "long.jsonl", 256, 6) == 6
    examples, _ = build_sft_examples(read_records(tmp_path / "long.jsonl"), tokenizer, 4096)
    lengths = [len(e["input_ids"]) for e in examples]
    assert len(lengths) == 6 and min(lengths) >= 256 // 4 and max(lengths) > 256 // 2
