"""common/deepspeed_utils.py: the DeepSpeed JSON with the values the Config owns written in (a disagreement is an
error), a bad --ds_config in one line, and init_distributed dropping only DeepSpeed's "built successfully" print."""
import os
import sys
import types

import pytest

from common import deepspeed_utils
from common.config import UserError
from common.deepspeed_utils import fill_ds_config, init_distributed, read_ds_config, shm_all_reduce_buffer

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


def test_init_distributed_drops_only_the_shm_op_line(monkeypatch, capsys):
    def fake_init_distributed():  # what deepspeed.init_distributed prints on a CPU machine, and something else
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("a line DeepSpeed has to say")

    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(init_distributed=fake_init_distributed))
    init_distributed()
    assert capsys.readouterr().out == "a line DeepSpeed has to say\n"


def test_each_rank_removes_its_own_shm_buffer_at_exit(monkeypatch, tmp_path):
    """DeepSpeed's CPU all-reduce leaves /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> behind; the
    recipes remove their own rank's at exit, and no other file."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29715")
    monkeypatch.setenv("RANK", "1")
    mine = tmp_path / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_29715_1"
    others = [tmp_path / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_29715_0",
              tmp_path / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_29716_1"]
    for path in (mine, *others):
        path.write_bytes(b"x")
    assert shm_all_reduce_buffer(tmp_path) == mine
    at_exit = []  # what init_distributed leaves for the process's exit, with the shm folder pointed at tmp_path
    monkeypatch.setattr(deepspeed_utils.atexit, "register", lambda fn, **kwargs: at_exit.append((fn, kwargs)))
    monkeypatch.setattr(deepspeed_utils, "shm_all_reduce_buffer", lambda: shm_all_reduce_buffer(tmp_path))
    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(init_distributed=lambda: None))
    init_distributed()
    assert len(at_exit) == 1
    for _ in range(2):  # gone already the second time: no error
        fn, kwargs = at_exit[0]
        fn(**kwargs)
    assert not mine.exists() and all(p.exists() for p in others)
