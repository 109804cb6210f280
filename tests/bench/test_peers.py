"""bench/peers.py: the command line, and short real runs of the cls and pretrain families (2 steps, 1 round) that
must print a table with both contenders and finite numbers."""
import json
import math
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

PEERS = REPO / "bench" / "peers.py"
sys.path.insert(0, str(REPO / "bench"))
import peers  # noqa: E402

ROW = re.compile(r"^\| (\w+) \(([^)]*)\) \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| "
                 r"([\d.]+)x \|$")


def run_peers(tmp_path, *args) -> tuple[dict, dict]:
    """Run peers.py; returns its table rows by contender and the --json report."""
    out = tmp_path / "peers.json"
    proc = subprocess.run([sys.executable, str(PEERS), *args, f"--json={out}"], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {}
    for line in proc.stdout.splitlines():
        if m := ROW.match(line):
            name, _, tok_s, computed_tok_s, step_ms, mem, useful, loss, ratio = m.groups()
            rows[name] = {"tok_s": float(tok_s.replace(",", "")), "step_ms": float(step_ms.replace(",", "")),
                          "computed_tok_s": float(computed_tok_s.replace(",", "")),
                          "mem": float(mem), "useful": float(useful), "loss": float(loss), "ratio": float(ratio)}
    return rows, json.loads(out.read_text())


def assert_finite_rows(rows: dict, names: list[str]):
    assert sorted(rows) == sorted(names), rows
    for name, row in rows.items():
        assert all(math.isfinite(v) for v in row.values()), (name, row)
        assert row["tok_s"] > 0 and row["step_ms"] > 0 and row["mem"] > 0 and 0 < row["useful"] <= 1, (name, row)
        # real tokens are a share of the computed ones: real tok/s = useful x computed tok/s (to the table's rounding)
        assert row["tok_s"] <= row["computed_tok_s"] + 1, (name, row)
    assert rows["ours"]["ratio"] == 1.0


@pytest.mark.slow
def test_cls_family_table_has_both_contenders_and_counts_padding(tmp_path):
    rows, report = run_peers(tmp_path, "--family", "cls", "--steps", "2", "--rounds", "1")
    assert_finite_rows(rows, ["ours", "hf"])
    rounds = report["cls"]["rounds"]
    assert [r["steps"] for r in rounds["ours"]] == [2] and [r["steps"] for r in rounds["hf"]] == [2]
    # the same data, batches of 16, right-padded in arrival order vs length-grouped: the peer computes pads
    assert rows["hf"]["useful"] < 1.0 and rows["ours"]["useful"] > rows["hf"]["useful"]
    for r in rounds["ours"] + rounds["hf"]:
        assert 0 < r["tokens"] <= r["tokens_computed"]
    assert report["cls"]["settings"]["lora_r"] == 16 and report["cls"]["settings"]["batch_size"] == 16


@pytest.mark.slow
def test_pretrain_family_table_has_both_contenders_on_the_same_model_and_windows(tmp_path):
    rows, report = run_peers(tmp_path, "--family", "pretrain", "--steps", "2", "--rounds", "1")
    assert_finite_rows(rows, ["ours", "torch"])
    assert rows["ours"]["useful"] == rows["torch"]["useful"] == 1.0
    ours, torch_loop = report["pretrain"]["rounds"]["ours"][0], report["pretrain"]["rounds"]["torch"][0]
    assert ours["tokens"] == torch_loop["tokens"] == 2 * 8 * 256  # steps x batch x window
    # same seed, same config, same first windows: the first loss agrees, so the two train the same thing
    assert ours["first_loss"] == pytest.approx(torch_loop["first_loss"], rel=1e-4)


def test_cli_defaults_per_family_and_overrides():
    args = peers.build_parser().parse_args(["--family=sft", "--max_seq_len=128", "--lora_r=8"])
    s = peers.family_settings("sft", args)
    assert (s["seq_len"], s["lora_r"], s["lora_alpha"], s["batch_size"]) == (128, 8, 16, 4)
    cls = peers.family_settings("cls", peers.build_parser().parse_args(["--seq_len=64"]))
    assert (cls["seq_len"], cls["lora_r"], cls["lora_alpha"], cls["batch_size"]) == (64, 16, 32, 16)
    assert cls["gradient_checkpointing"] is None  # resolved in the worker: on with a GPU
    with pytest.raises(SystemExit):
        peers.main(["--family=all", "--data_path=x.jsonl"])  # one family's data cannot feed all three


def test_sft_wrapper_keeps_its_command_line():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "sft_qlora_vs_peers.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for option in ("--steps", "--rounds", "--max_seq_len", "--model_path", "--contenders", "--gradient_checkpointing"):
        assert option in proc.stdout


def test_medians_over_rounds_with_and_without_reserved_memory():
    rounds = [{"tokens": 1000, "train_seconds": 2.0, "steps": 4, "peak_mem_gb": 3.0, "peak_reserved_gb": 4.0,
               "tokens_computed": 1250, "final_loss": 1.5, "mem_kind": "gpu"},
              {"tokens": 1000, "train_seconds": 4.0, "steps": 4, "peak_mem_gb": 5.0, "peak_reserved_gb": 6.0,
               "tokens_computed": 1250, "final_loss": 2.5, "mem_kind": "gpu"}]
    m = peers.medians(rounds)
    assert (m["tok_s"], m["step_ms"], m["mem_gb"], m["reserved_gb"]) == (375.0, 750.0, 4.0, 5.0)
    assert (m["useful"], m["final_loss"], m["rounds"]) == (0.8, 2.0, 2)
    cpu = [{**r, "peak_reserved_gb": None, "mem_kind": "rss"} for r in rounds]
    assert peers.medians(cpu)["reserved_gb"] is None
