"""A recipe's `@dataclass Config` is its whole configuration; this module turns the command line into one.

    cfg = parse_config(Config)          # --key=value or --key value; --flag alone sets a bool to true
    save_config(cfg, cfg.output_dir)    # output_dir/config.json, secrets left out

Values are typed by the field's annotation: bool, int, float, str, Optional[X] ("none" gives None), list[X]
(comma-separated) and Literal[...] (checked against its choices). `--help` lists every field with its type, default
and the comment written beside it in the dataclass, so the comment is the documentation.

Config files: `--config=run.yaml` (or .yml, or .json) reads field values from a file of `field: value` lines, and
every option on the command line overrides the file, wherever --config stands among them:

    bash run.sh --config=run.yaml --lr=1e-4             # run.yaml's values, with --lr from the command line

    # run.yaml: the keys are the Config's field names (`bash run.sh --help` lists them)
    model_path: /models/Llama-2-7b-hf
    lora_target_modules: [q_proj, v_proj]               # a YAML list, or "q_proj,v_proj" as on the command line
    max_steps: 500

Values in the file may be YAML/JSON's own types (numbers, true/false, lists, null for an optional field) or strings
written as on the command line; both are checked against the field's annotation. A key that is not a field, or a
value of the wrong type, stops the run with one line naming the file, the line and the key. The output_dir/config.json
every run writes is itself a valid --config, so re-running a run is `bash run.sh --config=out/config.json` (add
--output_dir=elsewhere to keep the first run's folder). Secret fields are written there as "<redacted>"; on load that
placeholder is skipped (the field keeps its default, or the value given on the command line), never taken as the value.
Relative paths in a config file are read from the current folder, as on the command line.
"""
import contextlib
import dataclasses
import inspect
import io
import json
import os
import sys
import tokenize
import types
import typing
from pathlib import Path

SECRET_WORDS = ("token", "api_key", "password", "secret")  # fields never written to config.json or logs


class UserError(ValueError):
    """A mistake in what the user gave (option, file, path): reported as one line, no traceback."""



def field_comments(cls) -> dict[str, str]:
    """The `# comment` on each field's line in the class source (empty when the source is unavailable)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments, current = {}, None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and current is None:
            current = tok.string
        elif tok.type == tokenize.COMMENT and current:
            comments[current] = tok.string.lstrip("# ").strip()
        elif tok.type == tokenize.NEWLINE:
            current = None
    return comments


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def parse_bool(raw: str) -> bool:
    """true/false, yes/no, on/off, 1/0 (any case); a ValueError otherwise (argparse reports it as a bad value)."""
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def convert(name: str, raw: str, tp):
    """Convert the string `raw` for field `name` to type `tp`, or raise UserError saying what was expected."""
    tp, optional = _unwrap_optional(tp)
    if optional and raw.lower() in ("none", "null", ""):
        return None
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            return parse_bool(raw)
        if origin is typing.Literal:
            choices = typing.get_args(tp)
            for choice in choices:
                if str(choice) == raw:
                    return choice
            raise UserError(f"--{name}: {raw!r} is not one of {', '.join(map(str, choices))}")
        if origin in (list, tuple):
            (item_tp, *_) = typing.get_args(tp) or (str,)
            return [convert(name, part.strip(), item_tp) for part in raw.split(",") if part.strip()]
        if tp in (int, float, str):
            return tp(raw)
    except UserError:
        raise
    except ValueError:
        raise UserError(f"--{name}: expected {getattr(tp, '__name__', tp)}, got {raw!r}") from None
    raise TypeError(f"Config field {name}: unsupported type {tp}")


CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
REDACTED = "<redacted>"


def is_secret(name: str) -> bool:
    return any(word in name.lower() for word in SECRET_WORDS)


def _type_name(tp) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def native_value(name: str, value, tp):
    """Check a value a YAML/JSON file gave for field `name` against its annotation `tp`: the file's own types (numbers,
    booleans, lists, null) are taken as they are when they fit, strings are converted as command-line values are.
    Raises UserError saying what was expected."""
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise UserError(f"{name}: expected {_type_name(inner)}, got null")
    if isinstance(value, str):
        return convert(name, value, tp)
    origin = typing.get_origin(inner)
    if origin is typing.Literal:
        choices = typing.get_args(inner)
        for choice in choices:
            if choice == value and type(choice) is type(value):
                return choice
        raise UserError(f"{name}: {value!r} is not one of {', '.join(map(str, choices))}")
    if origin in (list, tuple) and isinstance(value, list):
        (item_tp, *_) = typing.get_args(inner) or (str,)
        return [native_value(name, item, item_tp) for item in value]
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if inner is bool and isinstance(value, bool):
        return value
    if inner is int and is_number and float(value).is_integer():
        return int(value)
    if inner is float and is_number:
        return float(value)
    hint = " (quote it to give a string)" if inner is str else ""
    raise UserError(f"{name}: expected {_type_name(inner)}, got {value!r}{hint}")


def _yaml_entries(path: str, text: str) -> list[tuple[str, object, int]]:
    """(key, value, line) of a YAML mapping, in file order: the composed node tree keeps each key's line."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return []
        if not isinstance(root, yaml.MappingNode):
            raise UserError(f"{path}:{root.start_mark.line + 1}: expected a mapping of field: value lines")
        return [(str(loader.construct_object(key_node, deep=True)), loader.construct_object(value_node, deep=True),
                 key_node.start_mark.line + 1) for key_node, value_node in root.value]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{where}: not valid YAML ({problem})") from None
    finally:
        loader.dispose()


def _json_entries(path: str, text: str) -> list[tuple[str, object, int]]:
    """(key, value, line) of a JSON object, in file order; a key's line is the first that starts with `"key":`."""
    import re

    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}:1: expected a JSON object of field: value pairs")
    lines = text.splitlines()
    entries = []
    for key, value in data.items():
        pattern = re.compile(rf"^\s*[{{,]?\s*{re.escape(json.dumps(key))}\s*:")
        line = next((n for n, text_line in enumerate(lines, 1) if pattern.search(text_line)), 1)
        entries.append((key, value, line))
    return entries


def read_config_file(cls, path: str) -> dict:
    """The field values a --config file gives for `cls`, typed by its annotations (secret fields written as
    "<redacted>" skipped); raises UserError with the file and line on an unknown key or a value of the wrong type."""
    if not path.endswith(CONFIG_SUFFIXES):
        raise UserError(f"--config={path}: expected a .yaml, .yml or .json file")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--config={path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--config={path}: cannot be read ({e})") from None
    entries = _json_entries(path, text) if path.endswith(".json") else _yaml_entries(path, text)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values, seen = {}, {}
    for key, value, line in entries:
        if key not in hints:
            raise UserError(f"{path}:{line}: unknown key {key!r}; valid keys: {', '.join(names)}")
        if key in seen:
            raise UserError(f"{path}:{line}: key {key!r} given twice (first on line {seen[key]})")
        seen[key] = line
        if is_secret(key) and value == REDACTED:
            continue  # config.json's placeholder for a secret: not the value
        try:
            values[key] = native_value(key, value, hints[key])
        except UserError as e:
            raise UserError(f"{path}:{line}: {str(e).removeprefix('--')}") from None
    return values


def config_file_argument(argv: list[str]) -> tuple[str | None, list[str]]:
    """The --config path among the arguments (None when absent) and the arguments without it."""
    path, rest, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        key, has_value, value = arg.partition("=")
        if key != "--config":
            rest.append(arg)
            i += 1
            continue
        if not has_value:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise UserError("--config needs a value: a .yaml, .yml or .json file")
            value = argv[i + 1]
            i += 1
        if path is not None:
            raise UserError(f"--config given twice ({path}, {value}); give one file")
        path = value
        i += 1
    return path, rest


def config_help(cls) -> str:
    comments, hints = field_comments(cls), typing.get_type_hints(cls, include_extras=True)
    lines = [f"options of {cls.__module__}.{cls.__name__} (--key=value or --key value; --config=FILE.yaml reads them "
             "from a file, the command line overriding it):"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        option = f"--{f.name}={default!r}"
        lines.append(f"  {option:<44} {_type_name(hints[f.name]):<30} {comments.get(f.name, '')}")
    return "\n".join(lines)


def parse_config(cls, argv: list[str] | None = None):
    """Build `cls` from its defaults, overridden by the --config file's values, overridden by the other options in
    `argv` (default sys.argv[1:]), wherever --config stands among them."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(config_help(cls))
        sys.exit(0)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    config_path, argv = config_file_argument(argv)
    overrides = read_config_file(cls, config_path) if config_path else {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}; options look like --key=value")
        key, has_value, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in hints:
            raise UserError(f"unknown option --{key}; valid options: {', '.join('--' + n for n in names)}")
        if not has_value:
            next_is_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            if _unwrap_optional(hints[key])[0] is bool and not next_is_value:
                value = "true"
            elif next_is_value:
                i += 1
                value = argv[i]
            else:
                raise UserError(f"--{key} needs a value")
        overrides[key] = convert(key, value, hints[key])
        i += 1
    return cls(**overrides)


def refuse_values_below(cfg, least: dict):
    """Raise UserError naming the first option of cfg below its least allowed value ({"batch_size": 1, ...})."""
    for name, minimum in least.items():
        value = getattr(cfg, name)
        if value < minimum:
            raise UserError(f"--{name}={value}: expected at least {minimum}")


def config_to_dict(cfg) -> dict:
    return {k: (REDACTED if is_secret(k) and v else v) for k, v in dataclasses.asdict(cfg).items()}


def save_config(cfg, output_dir) -> Path:
    """Write the resolved config to output_dir/config.json (atomically; secrets redacted): the record of the run,
    and a valid --config to run it again."""
    path = Path(output_dir) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config_to_dict(cfg), indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def exit_on_user_error():
    """Report a UserError (bad option, bad data line, missing model) as one line on stderr and exit 2."""
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        close_process_group()
        sys.exit(2)


def close_process_group():
    """Destroy this rank's process group before exiting on an error, when there is one of several ranks: left to the
    interpreter's shutdown, gloo's threads can abort the process (SIGABRT, 'terminate called without an active
    exception') instead of letting it exit 2. Local only: it waits for no other rank. A one-process group stays (a
    DeepSpeed run in a test's process keeps using its groups after a tool's error)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.destroy_process_group()
