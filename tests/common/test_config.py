import json
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from common.config import UserError, config_help, parse_config, save_config


@dataclass
class Cfg:
    name: str = "tiny"  # the model
    steps: int = 10  # how many
    lr: float = 1e-3  # learning rate
    flag: bool = False  # a switch
    maybe: Optional[int] = None  # optional number
    mode: Literal["a", "b"] = "a"  # a choice
    modules: list[str] = field(default_factory=lambda: ["q", "v"])  # a list
    hf_token: str = ""  # a secret


def test_defaults_without_arguments():
    assert parse_config(Cfg, []) == Cfg()


def test_equals_and_space_forms_are_typed():
    cfg = parse_config(Cfg, ["--steps=5", "--lr", "0.5", "--name", "x", "--maybe=3", "--mode=b", "--modules=a,b,c"])
    assert (cfg.steps, cfg.lr, cfg.name, cfg.maybe, cfg.mode, cfg.modules) == (5, 0.5, "x", 3, "b", ["a", "b", "c"])
    assert isinstance(cfg.steps, int) and isinstance(cfg.lr, float)


@pytest.mark.parametrize("args,expected", [(["--flag"], True), (["--flag=false"], False), (["--flag", "true"], True),
                                           (["--flag", "--steps=2"], True), (["--flag=0"], False)])
def test_bool_forms(args, expected):
    assert parse_config(Cfg, args).flag is expected


def test_optional_none():
    assert parse_config(Cfg, ["--maybe=none"]).maybe is None


def test_unknown_key_lists_valid_ones():
    with pytest.raises(UserError) as e:
        parse_config(Cfg, ["--stepz=3"])
    assert "unknown option --stepz" in str(e.value) and "--steps" in str(e.value) and "--lr" in str(e.value)


@pytest.mark.parametrize("args,needle", [(["--steps=abc"], "--steps: expected int, got 'abc'"),
                                         (["--flag=maybe"], "--flag: expected bool"),
                                         (["--mode=c"], "--mode: 'c' is not one of a, b"),
                                         (["--steps"], "--steps needs a value"),
                                         (["steps=3"], "unexpected argument")])
def test_bad_values_are_clear(args, needle):
    with pytest.raises(UserError, match=None) as e:
        parse_config(Cfg, args)
    assert needle in str(e.value)


def test_help_shows_field_comments(capsys):
    text = config_help(Cfg)
    assert "--lr=0.001" in text and "learning rate" in text and "a choice" in text


def test_config_json_written_with_secrets_redacted(tmp_path):
    cfg = parse_config(Cfg, ["--hf_token=hf_abc123", "--steps=7"])
    path = save_config(cfg, tmp_path / "run")
    saved = json.loads(path.read_text())
    assert saved["steps"] == 7 and saved["modules"] == ["q", "v"]
    assert saved["hf_token"] == "<redacted>" and "hf_abc123" not in path.read_text()
