"""common/logs.py: metrics.jsonl rows, the step line, the progress bar's total, the reporters; and the step log's memory
fields: on GPUs the allocated peak, the reserved peak and the card's used memory (which sees
bitsandbytes' paged optimizer pages), each named in metrics.jsonl and in the step line; on CPU the RSS peak. torch.cuda
is monkeypatched (no GPU here)."""
import json
import re
import subprocess

import pytest
import torch

from common.config import UserError
from common.logs import StepLogger, format_step, memory_gb
from tests.conftest import REPO

GB = 10 ** 9


def fake_gpus(monkeypatch, allocated, reserved, free_total):
    """Two GPUs with the given peaks and (free, total) memory, by index."""
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: allocated[d.index])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d: reserved[d.index])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: free_total[d.index])


def test_gpu_memory_names_the_allocated_and_reserved_peaks_and_the_used_memory(monkeypatch, tmp_path):
    # GPU 1 holds paged optimizer pages torch never allocated: only mem_get_info sees them
    fake_gpus(monkeypatch, allocated=[3 * GB, 2 * GB], reserved=[4 * GB, 5 * GB],
              free_total=[(20 * GB, 24 * GB), (14 * GB, 24 * GB)])
    devices = [torch.device("cuda", 0), torch.device("cuda", 1)]
    fields = memory_gb(devices)
    assert fields == {"mem_gb": 3.0, "mem_reserved_gb": 5.0, "mem_used_gb": 10.0}  # the fullest GPU of each
    assert memory_gb(devices[1]) == {"mem_gb": 2.0, "mem_reserved_gb": 5.0, "mem_used_gb": 10.0}
    line = format_step(3, 10, {"loss": 1.5, "tokens_per_s": 1000.0, **fields})
    assert line.endswith("1,000 tok/s | mem 3.00 GB peak alloc | 5.00 GB peak reserved | 10.00 GB used on GPU"), line
    log = StepLogger(tmp_path, 10, report_to=())
    log.log(3, {"loss": 1.5, **fields})
    log.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert (row["mem_gb"], row["mem_reserved_gb"], row["mem_used_gb"]) == (3.0, 5.0, 10.0)


def test_cpu_memory_is_the_rss_peak(monkeypatch):
    def no_gpu(*args):
        raise AssertionError("a CPU run asked torch.cuda")

    for name in ("max_memory_allocated", "max_memory_reserved", "mem_get_info"):
        monkeypatch.setattr(torch.cuda, name, no_gpu)
    before = memory_gb(torch.device("cpu"))["mem_rss_gb"]
    block = bytearray(300 * 2 ** 20)  # touch 300 MiB: the peak grows by about that
    block[::4096] = b"x" * len(block[::4096])
    fields = memory_gb(torch.device("cpu"))
    assert list(fields) == ["mem_rss_gb"] and fields["mem_rss_gb"] >= max(before, 0.3)
    assert format_step(1, 2, fields) == f"step 1/2 | mem {fields['mem_rss_gb']:.2f} GB peak RSS"


def test_metrics_rows_and_step_lines(tmp_path, capsys):
    log = StepLogger(tmp_path, 20, report_to=["none"], config={"lr": 0.1}, progress_bar=False)
    log.info("model tiny")
    log.log(1, {"loss": 2.5, "lr": 1e-3, "grad_norm": None, "tokens_per_s": 1234.5})
    log.log(2, {"eval_loss": 2.25}, echo=False)
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in row.items() if k != "time"} for row in rows] == [
        {"step": 1, "loss": 2.5, "lr": 1e-3, "tokens_per_s": 1234.5}, {"step": 2, "eval_loss": 2.25}]
    assert all(isinstance(row["time"], float) for row in rows)
    assert capsys.readouterr().out.splitlines() == ["model tiny", "step 1/20 | loss 2.5000 | lr 1.0e-03 | 1,234 tok/s"]
    assert not (tmp_path / "tensorboard").exists()  # --report_to=none: metrics.jsonl only
    assert (tmp_path / "loss.png").is_file()


def test_format_step_names_each_value_in_order():
    line = format_step(7, 100, {"mfu": 0.123, "grad_norm": 1.23456, "eval_loss": 1.0, "loss": 0.5, "lr": 2e-4,
                                "tokens_per_s_per_gpu": 99.6, "unknown": 3})
    assert line == ("step 7/100 | loss 0.5000 | eval_loss 1.0000 | lr 2.0e-04 | grad_norm 1.235 | 100 tok/s/gpu | "
                    "mfu 12.3%")


def test_the_progress_bar_counts_to_total_steps(tmp_path):
    log = StepLogger(tmp_path, 37, report_to=["none"], progress_bar=True)
    assert log.bar.total == log.total_steps == 37
    log.advance(2)
    log.info("written above the bar")
    assert log.bar.n == 2
    log.close()
    assert StepLogger(tmp_path, 37, report_to=["none"], progress_bar=False).bar is None


def test_tensorboard_by_default_and_ranks_above_0_write_nothing(tmp_path):
    (tmp_path / "main").mkdir()
    log = StepLogger(tmp_path / "main", 2, progress_bar=False)
    log.log(1, {"loss": 1.0}, echo=False)
    log.close()
    assert any((tmp_path / "main" / "tensorboard").iterdir())
    other = StepLogger(tmp_path / "rank1", 2, report_to=["wandb"], enabled=False)
    other.log(1, {"loss": 1.0})
    other.close()
    assert not (tmp_path / "rank1").exists()


def test_an_unknown_reporter_is_a_user_error(tmp_path):
    with pytest.raises(UserError) as e:
        StepLogger(tmp_path, 2, report_to=["tensorboard", "comet"])
    assert str(e.value) == "--report_to: unknown ['comet']; expected some of tensorboard, wandb, mlflow, none"


@pytest.mark.slow  # a fresh interpreter importing the whole stack: about 10 s
def test_setup_check_imports_the_stack_without_third_party_notices():
    """`bash setup.sh --check`, setup.sh's last step alone: its screen is the one "ready" line, none of the notices the
    libraries print at import (torchao's kernels failing to load on CPU, torch's pytree deprecations, bitsandbytes)."""
    proc = subprocess.run(["bash", str(REPO / "setup.sh"), "--check"], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert re.fullmatch(r"ready: torch \S+, transformers \S+, peft \S+, bitsandbytes \S+\n", proc.stdout), proc.stdout
