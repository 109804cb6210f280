"""common/deepspeed_utils.py: the DeepSpeed JSON with the values the Config owns written in (a disagreement is an
error), a bad --ds_config in one line, init_distributed without the shm all-reduce, and a held JIT build lock named."""
import os
import subprocess
import sys

import pytest

from common.config import UserError
from common.deepspeed_utils import fill_ds_config, read_ds_config, say_if_build_is_locked
from tests.conftest import REPO

OWNED = {"train_micro_batch_size_per_gpu": (4, "--batch_size"), "gradient_accumulation_steps": (2, "--grad_accum"),
         "zero_optimization.stage": (3, "--zero_stage"), "optimizer": (None, "--lr")}


def test_fill_ds_config_writes_in_what_the_config_owns():
    given = {"gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 3, "overlap_comm": True}}
    filled = fill_ds_config(given, OWNED, "ds_config.json")
    assert filled == {"gradient_accumulation_steps": 2, "train_micro_batch_size_per_gpu": 4,
                      "zero_optimization": {"stage": 3, "overlap_comm": True}}
    assert given["gradient_accumulation_steps"] == "auto"  # a copy: the JSON as read is left alone


@pytest.mark.parametrize("given,expected", [
    ({"zero_optimization": {"stage": 2}}, "ds_config.json: 'zero_optimization.stage' is 2 but --zero_stage gives 3; "
                                          "the command line owns this value, so remove it from the JSON"),
    ({"optimizer": {"type": "Adam"}}, "ds_config.json: remove 'optimizer'; train.py builds it from --lr"),
    ({"zero_optimization": 3}, "ds_config.json: 'zero_optimization' must be an object")])
def test_fill_ds_config_refuses_a_json_that_disagrees(given, expected):
    with pytest.raises(UserError) as e:
        fill_ds_config(given, OWNED, "ds_config.json")
    assert str(e.value) == expected


@pytest.mark.parametrize("text,expected", [(None, "no such file"), ('{"a": 1,\n "b"}', "2: malformed JSON"),
                                           ("[1, 2]", "expected a JSON object")])
def test_read_ds_config_errors_are_one_line(tmp_path, text, expected):
    path = tmp_path / "ds.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(UserError, match=f"^--ds_config={path}:? ?{expected}"):
        read_ds_config(path)
    path.write_text('{"zero_optimization": {"stage": 1}}')
    assert read_ds_config(path) == {"zero_optimization": {"stage": 1}}


INIT_ONE_PROCESS = """
import os, sys
from pathlib import Path
from common.runtime import set_single_process_env
from common.deepspeed_utils import init_distributed
set_single_process_env()
init_distributed()
import deepspeed.comm.comm as ds_comm
buffers = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{os.environ['MASTER_PORT']}_*"))
print("shm op", ds_comm.cdb.shm_comm_op, "buffers", len(buffers))
"""


@pytest.mark.slow
def test_init_distributed_neither_builds_nor_maps_the_shm_all_reduce(tmp_path):
    """DeepSpeed's CPU shared-memory all-reduce serves inference only: init_distributed leaves it out, so a fresh
    machine compiles nothing at start (TORCH_EXTENSIONS_DIR stays empty) and no rank maps a 69 MB /dev/shm buffer."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "WORLD_SIZE": "1"}
    proc = subprocess.run([sys.executable, "-c", INIT_ONE_PROCESS], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "shm op None buffers 0" in proc.stdout
    assert not any(tmp_path.iterdir())


def test_a_held_build_lock_is_named_before_torch_waits_on_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    say_if_build_is_locked("cpu_adam")
    assert capsys.readouterr().out == ""
    lock = tmp_path / "cpu_adam" / "lock"  # what a compile killed midway leaves
    lock.touch()
    say_if_build_is_locked("cpu_adam")
    said = capsys.readouterr().out
    assert said.startswith(f"waiting for {lock}: ") and "delete the file" in said and said.count("\n") == 1
