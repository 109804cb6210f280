"""Turn local raw text files into normalized, compressed .jsonl.zst shards and a manifest, ready for pretraining.

    python data_scripts/shard_corpus.py --inputs /data/pile/train /data/wudao --out_dir /data/shards --workers 8
    python data_scripts/shard_corpus.py --inputs data/pretrain/raw --out_dir data/pretrain/shards --max_lines 512

Inputs are files or folders (searched recursively; a manifest.json inside is ignored, so a shard folder can be
re-sharded) of .jsonl, .jsonl.zst, .json (a list of objects), .parquet (needs pyarrow) and .txt. The format of each
record is recognized by its fields:
    The Pile     {"text", "meta"?}                              -> text
    WuDao        {"id"?, "dataType"?, "title"?, "content"}      -> title + "\\n" + content
    PandaLLM     {"input"?, "target"}                           -> input + target
    Alpaca       {"instruction", "input"?, "output"}            -> instruction, input, output on separate lines
    .txt         documents separated by blank lines (--txt_split=paragraph), the whole file (file) or each line (line)

Every output line is {"text": "...", "meta": {...}}. meta keeps the record's own metadata (the Pile's meta object,
WuDao's id/dataType/title, any other non-text field) plus "source" (the file, relative to the folder given, or its name)
and "line" ("item" for .json lists, "row" for parquet) where the record was read; a record that already has these
keeps its own, so re-sharding shards keeps the first origin. Texts get "\\n" line ends and lose surrounding
whitespace; empty ones are dropped and counted.

Output: <out_dir>/<prefix>-00000.jsonl.zst, -00001, ... of at most --max_lines lines each, and <out_dir>/manifest.json
(per shard: file, lines, bytes, sha256; totals; skipped and empty counts; per-input counts; the settings). The shards
are byte-identical whatever --workers is: inputs are read in sorted order and records in file order.
--on_bad_line=error (default) stops at the first bad record with one line `error: <file>:<line>: <what>` and writes
nothing; --on_bad_line=skip drops bad records and counts them in the manifest. A .json file that is not a list of
objects stops the run either way. Everything is built in a temporary folder beside out_dir and renamed into place, so
out_dir holds the previous complete output or the new one, never a half-written mix.
"""
import argparse
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import shutil
import sys
from pathlib import Path

import zstandard
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a standalone script: make `common` importable
from common.config import UserError, exit_on_user_error  # noqa: E402
from common.data import DataError  # noqa: E402

SUFFIXES = (".jsonl.zst", ".jsonl", ".json", ".parquet", ".txt")
POSITION_KEYS = ("line", "item", "row")  # meta key naming where a record was read, by container
PART_LEVEL = 1  # the workers' temporary per-file outputs: fast compression, read once


class BadRecord(ValueError):
    """A record that cannot become a text; the message says what was expected (the caller adds file:line)."""


def file_kind(path: Path) -> str | None:
    return next((s for s in SUFFIXES if path.name.endswith(s)), None)


def find_input_files(inputs: list[str]) -> list[tuple[Path, str]]:
    """(path, source name) of every input file, sorted by source name; a folder gives its supported files, named
    folder/relative/path, so the names (and the shards) do not depend on where the command was run."""
    found = {}
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and file_kind(p) and p.name != "manifest.json")
            if not files:
                raise UserError(f"{given}: no {', '.join(SUFFIXES)} files in this folder")
            named = [(p, f"{path.resolve().name}/{p.relative_to(path).as_posix()}") for p in files]
        elif path.is_file():
            if not file_kind(path):
                raise UserError(f"{given}: unsupported file type; expected one of {', '.join(SUFFIXES)}")
            named = [(path, path.name)]
        else:
            raise UserError(f"{given}: no such file or folder")
        for p, source in named:
            earlier = found.get(source)
            if earlier and earlier.resolve() != p.resolve():
                raise UserError(f"{earlier} and {p} would both be named '{source}' in the shards' meta; "
                                "give them from folders with different names")
            found[source] = p
    return [(found[source], source) for source in sorted(found)]


def json_type(value) -> str:
    return "null" if value is None else {dict: "object", list: "list", str: "string", bool: "boolean"}.get(
        type(value), type(value).__name__)


def string_field(record: dict, field: str, required=True) -> str:
    if field not in record:
        if required:
            raise BadRecord(f"missing field '{field}'")
        return ""
    value = record[field]
    if not isinstance(value, str):
        raise BadRecord(f"field '{field}' must be a string, got {json_type(value)}")
    return value


def record_text(record: dict) -> tuple[str, dict]:
    """A raw record as (text, its own metadata), its format recognized by its fields."""
    if "text" in record:  # The Pile (and our own shards)
        text = string_field(record, "text")
        meta = record.get("meta", {})
        meta = dict(meta) if isinstance(meta, dict) else {"meta": meta}
        meta.update({k: v for k, v in record.items() if k not in ("text", "meta")})
        return text, meta
    if "content" in record:  # WuDao
        title, content = string_field(record, "title", required=False), string_field(record, "content")
        text = f"{title}\n{content}" if title.strip() else content
    elif "instruction" in record:  # Alpaca
        parts = [string_field(record, "instruction"), string_field(record, "input", required=False),
                 string_field(record, "output")]
        text = "\n".join(p for p in parts if p.strip())
    elif "target" in record:  # PandaLLM
        text = string_field(record, "input", required=False) + string_field(record, "target")
    else:
        raise BadRecord(f"unrecognized record with fields {sorted(record)}; expected The Pile {{text, meta?}}, "
                        "WuDao {title?, content}, PandaLLM {input, target} or Alpaca {instruction, input?, output}")
    text_fields = {"content", "instruction", "input", "output", "target"}
    return text, {k: v for k, v in record.items() if k not in text_fields}  # WuDao keeps id, dataType and title


def normalize_text(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def iter_jsonl(path: Path, kind: str):
    """(line number, object or None, problem or None) for each non-blank line of a .jsonl or .jsonl.zst file."""
    with open(path, "rb") as raw:
        if kind == ".jsonl.zst":  # read_across_frames: some published .zst files are several frames end to end
            raw = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
        for lineno, line in enumerate(raw, start=1):
            if lineno == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
            line = line.rstrip(b"\r\n")  # else an error at the line's end is reported at column 1 of the next
            if not line.strip():
                continue
            try:
                item = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield lineno, None, f"not UTF-8 text (byte {e.start} of the line)"
                continue
            except json.JSONDecodeError as e:
                yield lineno, None, f"malformed JSON ({e.msg} at column {e.colno})"
                continue
            if not isinstance(item, dict):
                yield lineno, None, f"expected a JSON object, got {json_type(item)}"
                continue
            yield lineno, item, None


def iter_json_list(path: Path):
    try:
        items = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {json_type(items)}")
    for i, item in enumerate(items):
        yield i, item, (None if isinstance(item, dict) else f"expected a JSON object, got {json_type(item)}")


def iter_parquet(path: Path):
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        row = 0
        for batch in batches:
            for item in batch.to_pylist():  # rows as dicts, one batch in memory at a time
                yield row, item, None
                row += 1
    except pyarrow.ArrowException as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None


def iter_txt(path: Path, txt_split: str):
    """(first line number, {"text": document}, problem) for each document of a plain text file."""
    doc, start = [], None
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if lineno == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, None, f"not UTF-8 text (byte {e.start} of the line)"
                continue
            if txt_split == "line":
                if line.strip():
                    yield lineno, {"text": line}, None
            elif txt_split == "paragraph" and not line.strip():
                if doc:
                    yield start, {"text": "".join(doc)}, None
                doc, start = [], None
            else:
                doc.append(line)
                start = start or lineno
    if doc:
        yield start, {"text": "".join(doc)}, None


def iter_file_records(path: Path, kind: str, txt_split: str):
    """(position key, position, record or None, problem or None) for every record of one input file."""
    if kind in (".jsonl", ".jsonl.zst"):
        return (("line", n, item, problem) for n, item, problem in iter_jsonl(path, kind))
    if kind == ".json":
        return (("item", n, item, problem) for n, item, problem in iter_json_list(path))
    if kind == ".parquet":
        return (("row", n, item, problem) for n, item, problem in iter_parquet(path))
    return (("line", n, item, problem) for n, item, problem in iter_txt(path, txt_split))


def where(path: Path, key: str, n: int) -> str:
    return f"{path}:{n}" if key == "line" else f"{path}:{key} {n}"


def convert_file(task: dict) -> dict:
    """Worker: one input file -> a temporary part file of normalized lines, in file order; returns its counts."""
    path, source = Path(task["path"]), task["source"]
    counts = {"file": source, "records": 0, "skipped_lines": 0, "empty_texts": 0, "text_chars": 0}
    with open(task["part"], "wb") as f, zstandard.ZstdCompressor(level=PART_LEVEL).stream_writer(f) as out:
        for key, n, item, problem in iter_file_records(path, file_kind(path), task["txt_split"]):
            if problem is None:
                try:
                    text, meta = record_text(item)
                except BadRecord as e:
                    problem = str(e)
            if problem is not None:
                if task["on_bad_line"] == "error":
                    raise DataError(f"{where(path, key, n)}: {problem}")
                counts["skipped_lines"] += 1
                continue
            text = normalize_text(text)
            if not text:
                counts["empty_texts"] += 1
                continue
            meta.setdefault("source", source)
            if not any(k in meta for k in POSITION_KEYS):
                meta[key] = n
            out.write((json.dumps({"text": text, "meta": meta}, ensure_ascii=False, default=str) + "\n").encode())
            counts["records"] += 1
            counts["text_chars"] += len(text)
    return counts


def iter_part_lines(part: Path):
    with open(part, "rb") as f:
        yield from io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(f))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shards(lines, folder: Path, prefix: str, max_lines: int, level: int) -> list[dict]:
    """Cut a stream of lines into <prefix>-NNNNN.jsonl.zst files of at most max_lines lines."""
    shards, lines = [], iter(lines)
    for first in lines:  # each pass writes one shard, from its first line on
        path = folder / f"{prefix}-{len(shards):05d}.jsonl.zst"
        count = 0
        with open(path, "wb") as f, zstandard.ZstdCompressor(level=level).stream_writer(f) as out:
            for line in itertools.chain([first], itertools.islice(lines, max_lines - 1)):
                out.write(line)
                count += 1
        shards.append({"file": path.name, "lines": count, "bytes": path.stat().st_size, "sha256": file_sha256(path)})
    return shards


def check_out_dir(out_dir: Path):
    """Refuse to replace a folder that is not an earlier output of this script (or empty)."""
    if out_dir.exists() and not (out_dir.is_dir() and (
            (out_dir / "manifest.json").is_file() or not any(out_dir.iterdir()))):
        raise UserError(f"--out_dir={out_dir}: exists and is not a shard folder (no manifest.json); "
                        "give a new or empty folder, or an earlier output of this script to replace")


def move_into_place(tmp: Path, out_dir: Path):
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def shard_corpus(inputs, out_dir, max_lines=16384, prefix="shard", workers=1, txt_split="paragraph",
                 on_bad_line="error", compression_level=3) -> dict:
    """Read every input, write the shards and manifest.json into out_dir (replaced atomically); return the manifest."""
    if max_lines < 1:
        raise UserError(f"--max_lines={max_lines}: expected a positive number of lines per shard")
    if workers < 1:
        raise UserError(f"--workers={workers}: expected at least 1")
    if not prefix or "/" in prefix or prefix.startswith("."):
        raise UserError(f"--prefix={prefix!r}: expected a plain file name prefix such as 'shard'")
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    files = find_input_files(inputs)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    parts = tmp / ".parts"
    parts.mkdir(parents=True)
    tasks = [{"path": str(p), "source": source, "part": str(parts / f"{i:06d}.jsonl.zst"), "txt_split": txt_split,
              "on_bad_line": on_bad_line} for i, (p, source) in enumerate(files)]
    per_input = []

    def ordered_part_lines(results):
        # results arrive in input order whatever the worker count, so the shards are the same
        with tqdm(total=len(tasks), unit="file", desc="sharding", disable=None) as bar:
            for task, counts in zip(tasks, results):
                per_input.append(counts)
                bar.update(1)
                bar.set_postfix(records=sum(c["records"] for c in per_input))
                yield from iter_part_lines(Path(task["part"]))
                os.remove(task["part"])

    try:
        if workers == 1 or len(tasks) == 1:
            shards = write_shards(ordered_part_lines(map(convert_file, tasks)), tmp, prefix, max_lines,
                                  compression_level)
        else:
            with multiprocessing.Pool(min(workers, len(tasks))) as pool:
                shards = write_shards(ordered_part_lines(pool.imap(convert_file, tasks)), tmp, prefix, max_lines,
                                      compression_level)
        if not shards:
            raise UserError(f"no text in any of the {len(files)} input files (all records empty or skipped)")
        shutil.rmtree(parts)
        manifest = {
            "created_by": "data_scripts/shard_corpus.py",
            "line_format": '{"text": str, "meta": {"source": str, "line" | "item" | "row": int, ...}}',
            "shards": shards,
            "total_shards": len(shards),
            "total_lines": sum(s["lines"] for s in shards),
            "total_bytes": sum(s["bytes"] for s in shards),
            "total_text_chars": sum(c["text_chars"] for c in per_input),
            "skipped_lines": sum(c["skipped_lines"] for c in per_input),
            "empty_texts": sum(c["empty_texts"] for c in per_input),
            "inputs": per_input,
            "settings": {"max_lines": max_lines, "prefix": prefix, "txt_split": txt_split,
                         "on_bad_line": on_bad_line, "compression_level": compression_level},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                           encoding="utf-8")
        move_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", nargs="+", required=True, help="files or folders of raw text")
    p.add_argument("--out_dir", required=True, help="where the shards and manifest.json go (replaced if there)")
    p.add_argument("--max_lines", type=int, default=16384, help="texts per shard (default 16384)")
    p.add_argument("--prefix", default="shard", help="shard file names: <prefix>-00000.jsonl.zst")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes reading input files in parallel")
    p.add_argument("--txt_split", choices=("paragraph", "file", "line"), default="paragraph",
                   help=".txt documents: separated by blank lines (default), one per file, or one per line")
    p.add_argument("--on_bad_line", choices=("error", "skip"), default="error",
                   help="a malformed or unrecognized record: stop with file:line (default), or skip and count it")
    p.add_argument("--compression_level", type=int, default=3, help="zstd level of the shards (3: fast; 19: small)")
    args = p.parse_args(argv)
    with exit_on_user_error():
        manifest = shard_corpus(args.inputs, args.out_dir, args.max_lines, args.prefix, args.workers,
                                args.txt_split, args.on_bad_line, args.compression_level)
    print(f"wrote {manifest['total_lines']:,} texts ({manifest['total_text_chars']:,} characters) from "
          f"{len(manifest['inputs'])} files into {manifest['total_shards']} shards "
          f"({manifest['total_bytes']:,} bytes) in {args.out_dir}; skipped {manifest['skipped_lines']:,} bad lines, "
          f"dropped {manifest['empty_texts']:,} empty texts")


if __name__ == "__main__":
    main()
