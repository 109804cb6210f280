"""A recipe's `@dataclass Config` is its whole configuration; this module turns the command line into one.

    cfg = parse_config(Config)          # --key=value or --key value; --flag alone sets a bool to true
    save_config(cfg, cfg.output_dir)    # output_dir/config.json, secrets left out

Values are typed by the field's annotation: bool, int, float, str, Optional[X] ("none" gives None), list[X]
(comma-separated) and Literal[...] (checked against its choices). `--help` lists every field with its type, default
and the comment written beside it in the dataclass, so the comment is the documentation.
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


def config_help(cls) -> str:
    comments, hints = field_comments(cls), typing.get_type_hints(cls, include_extras=True)
    lines = [f"options of {cls.__module__}.{cls.__name__} (--key=value or --key value):"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        tp = hints[f.name]
        tp = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
        option = f"--{f.name}={default!r}"
        lines.append(f"  {option:<44} {tp:<30} {comments.get(f.name, '')}")
    return "\n".join(lines)


def parse_config(cls, argv: list[str] | None = None):
    """Build `cls` from its defaults overridden by `argv` (default sys.argv[1:])."""
    argv = sys.argv[1:] if argv is None else list(argv)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    overrides, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(config_help(cls))
            sys.exit(0)
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


def config_to_dict(cfg) -> dict:
    return {k: ("<redacted>" if any(w in k.lower() for w in SECRET_WORDS) and v else v)
            for k, v in dataclasses.asdict(cfg).items()}


def save_config(cfg, output_dir) -> Path:
    """Write the resolved config to output_dir/config.json (atomically; secrets redacted)."""
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
        sys.exit(2)
