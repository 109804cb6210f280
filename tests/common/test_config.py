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
    maybe: Optional[int] = None  # optional number  # noqa: UP045 (the typing.Optional spelling parses too)
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


def write(path, text):
    path.write_text(text)
    return str(path)


def test_a_yaml_file_gives_typed_values_and_the_command_line_overrides_it_wherever_config_stands(tmp_path):
    run = write(tmp_path / "run.yaml", "# my run\nsteps: 5\nlr: 1e-4\nflag: true\nmaybe: 3\nmode: b\n"
                                       "modules: [k, o]\nname: from_file\n")
    cfg = parse_config(Cfg, [f"--config={run}"])
    assert cfg == Cfg(steps=5, lr=1e-4, flag=True, maybe=3, mode="b", modules=["k", "o"], name="from_file")
    assert isinstance(cfg.lr, float)
    for argv in (["--config", run, "--steps=9", "--modules=q"], ["--steps", "9", "--modules=q", f"--config={run}"]):
        cfg = parse_config(Cfg, argv)
        assert (cfg.steps, cfg.modules, cfg.lr, cfg.name) == (9, ["q"], 1e-4, "from_file")


def test_a_json_file_and_command_line_strings_in_a_file(tmp_path):
    run = write(tmp_path / "run.json", '{\n  "steps": 4,\n  "lr": 0.5,\n  "maybe": null,\n  "modules": "a,b",\n'
                                       '  "flag": "yes"\n}\n')
    assert parse_config(Cfg, [f"--config={run}"]) == Cfg(steps=4, lr=0.5, maybe=None, modules=["a", "b"], flag=True)
    yml = write(tmp_path / "run.yml", "maybe: null\nsteps: '7'\n")
    assert parse_config(Cfg, ["--maybe=2", f"--config={yml}"]) == Cfg(maybe=2, steps=7)


@pytest.mark.parametrize("name,text,expected", [
    ("run.yaml", "steps: 5\n\nlr_rate: 3\n", "run.yaml:3: unknown key 'lr_rate'; valid keys: name, steps, lr, flag, "
                                            "maybe, mode, modules, hf_token"),
    ("run.json", '{\n  "steps": 5,\n  "lr_rate": 3\n}', "run.json:3: unknown key 'lr_rate'; valid keys: name, steps, "
                                                        "lr, flag, maybe, mode, modules, hf_token"),
    ("run.yaml", "steps: 5\nlr: fast\n", "run.yaml:2: lr: expected float, got 'fast'"),
    ("run.yaml", "steps: 2.5\n", "run.yaml:1: steps: expected int, got 2.5"),
    ("run.yaml", "flag: 1\n", "run.yaml:1: flag: expected bool, got 1"),
    ("run.json", '{"steps": null}', "run.json:1: steps: expected int, got null"),
    ("run.yaml", "name: 12\n", "run.yaml:1: name: expected str, got 12 (quote it to give a string)"),
    ("run.yaml", "mode: c\n", "run.yaml:1: mode: 'c' is not one of a, b"),
    ("run.yaml", "modules: [q, 3]\n", "run.yaml:1: modules: expected str, got 3 (quote it to give a string)"),
    ("run.yaml", "steps: 1\nsteps: 2\n", "run.yaml:2: key 'steps' given twice (first on line 1)"),
    ("run.yaml", "steps: 1\nlr: [1\n", "run.yaml:3: not valid YAML (expected ',' or ']', but got '<stream end>')"),
    ("run.yaml", "- steps\n", "run.yaml:1: expected a mapping of field: value lines"),
    ("run.json", '{"steps": 1\n "lr": 2}', "run.json:2: not valid JSON (Expecting ',' delimiter)"),
    ("run.toml", "steps = 1\n", "--config=run.toml: expected a .yaml, .yml or .json file"),
])
def test_file_errors_are_one_line_naming_the_file_and_line(tmp_path, monkeypatch, name, text, expected):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / name, text)
    with pytest.raises(UserError) as e:
        parse_config(Cfg, [f"--config={name}", "--steps=3"])
    assert str(e.value) == expected


@pytest.mark.parametrize("argv,expected", [(["--config=nope.yaml"], "--config=nope.yaml: no such file"),
                                           (["--config"], "--config needs a value: a .yaml, .yml or .json file"),
                                           (["--config=a.yaml", "--config=b.yaml"],
                                            "--config given twice (a.yaml, b.yaml); give one file")])
def test_config_option_errors(tmp_path, monkeypatch, argv, expected):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        parse_config(Cfg, argv)
    assert str(e.value) == expected


def test_saved_config_json_is_a_valid_config_and_redacted_secrets_are_skipped(tmp_path):
    cfg = parse_config(Cfg, ["--hf_token=hf_abc123", "--steps=7", "--maybe=4", "--mode=b", "--lr=0.25"])
    path = save_config(cfg, tmp_path / "run")
    reloaded = parse_config(Cfg, [f"--config={path}"])
    assert reloaded == Cfg(steps=7, maybe=4, mode="b", lr=0.25)  # hf_token keeps its default, not "<redacted>"
    assert parse_config(Cfg, [f"--config={path}", "--hf_token=hf_new"]).hf_token == "hf_new"
    write(tmp_path / "given.yaml", "hf_token: hf_in_file\n")  # a real secret in a file the user wrote is taken
    assert parse_config(Cfg, [f"--config={tmp_path / 'given.yaml'}"]).hf_token == "hf_in_file"


def test_help_mentions_config_files():
    assert "--config=FILE.yaml" in config_help(Cfg)
