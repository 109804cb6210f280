"""bench/loss_memory.py and bench/lora_dropout.py: short runs print their tables, with equal losses for the plain and
chunked loss and the same tokens for both dropout settings (the figures are the benches' to report, not a test's)."""
import subprocess
import sys

from tests.conftest import REPO


def test_prints_a_row_with_equal_losses(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "loss_memory.py"), "--vocab=3000",
                           "--seq_len=64", "--chunk=16", "--rounds=1", "--threads=1"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["3,000"], proc.stdout
    for row in rows:
        plain_mb, chunked_mb, loss_diff = float(row[2].replace(",", "")), float(row[3].replace(",", "")), float(row[7])
        assert plain_mb > 0 and chunked_mb > 0, row
        assert loss_diff < 1e-5, row


def test_lora_dropout_bench_prints_both_contenders(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "lora_dropout.py"), "--rounds=1", "--batches=1",
                           "--threads=1"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["0", "0.05"], proc.stdout
    assert rows[0][1] == rows[1][1]  # the same batches, the same real tokens
    assert all(float(row[3]) > 0 for row in rows), rows
