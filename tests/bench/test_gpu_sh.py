"""bench/gpu.sh on a machine without a GPU: it parses, and --dry-run lists the five measurements without running one."""
import os
import re
import subprocess
from collections import defaultdict

from tests.conftest import REPO

GPU_SH = REPO / "bench" / "gpu.sh"


def dry_run(tmp_path, *args, **env):
    return subprocess.run(["bash", str(GPU_SH), "--dry-run", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OUT": str(tmp_path / "out"), **env}, cwd=tmp_path)


def test_gpu_sh_parses_and_says_it_has_not_run_on_a_gpu():
    proc = subprocess.run(["bash", "-n", str(GPU_SH)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "NOT RUN ON A GPU YET" in GPU_SH.read_text()[:2000]


def test_dry_run_lists_the_five_measurements_and_runs_nothing(tmp_path):
    proc = dry_run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = defaultdict(str)  # measurement -> its listed command lines
    for line in proc.stdout.splitlines():
        if m := re.match(r"  \[(\w+)\] ", line):
            lines[m[1]] += line + "\n"
    text = proc.stdout
    # 1 full pretraining of a random 1B at sequence 2048 under FSDP
    assert "pretrain/fsdp/run.sh --model_config=1b --seq_len=2048" in lines["pretrain_1b"]
    # 2 QLoRA at 8B on a random model saved first, and the peers comparison on the same model and data
    assert "make_model.py llama3-8b" in lines["make_model_8b"]
    assert "sft/qlora/run.sh" in lines["qlora_8b"] and "--max_seq_len=2048" in lines["qlora_8b"]
    assert "bench/peers.py --family=sft" in lines["peers_sft_8b"]
    assert "random-8b" in lines["qlora_8b"] and "random-8b" in lines["peers_sft_8b"]
    # 3 LoRA on GPTQ int4: quantize the random 8B, then sft/peft-int4 on it
    assert "data_scripts/quantize_gptq.py" in lines["quantize_gptq_8b"]
    assert "sft/peft-int4/run.sh" in lines["gptq_lora_8b"] and "random-8b-gptq-int4" in lines["gptq_lora_8b"]
    # 4 full fine-tune at 8B with ZeRO-2 and the optimizer offloaded
    assert "sft/full-ft-deepspeed-offload/run.sh" in text
    assert "--zero_stage=2 --offload_optimizer=true" in lines["fullft_offload_8b"]
    # 5 QLoRA peak memory at 65B, sequence 2048, batch 1, with the arithmetic estimate beside it
    assert "65b.json 2048" in lines["qlora_65b_memory"] and "memory_estimate.py --seq=2048" in text
    assert "[summary]" in text
    assert not (tmp_path / "out").exists()  # nothing written, nothing run


def test_extra_options_reach_every_recipe_run_and_only_selects(tmp_path):
    proc = dry_run(tmp_path, "--log_every=7", ONLY="pretrain_1b,gptq_lora_8b")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = [line for line in proc.stdout.splitlines() if "run.sh" in line]
    assert len(runs) == 2 and all("--log_every=7" in line for line in runs), runs
    assert "qlora_65b_memory]" not in proc.stdout and "peers.py" not in proc.stdout
    bad = dry_run(tmp_path, ONLY="pretrain_2b")
    assert bad.returncode != 0 and "unknown measurement 'pretrain_2b'" in bad.stderr
