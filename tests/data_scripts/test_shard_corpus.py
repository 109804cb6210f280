import hashlib
import io
import json

import pytest
import zstandard

from common.config import UserError
from common.data import DataError
from data_scripts.shard_corpus import shard_corpus
from tests.conftest import REPO, run_script

SCRIPT = REPO / "data_scripts" / "shard_corpus.py"
BUNDLED = REPO / "data" / "pretrain"


def write_jsonl(path, rows, compress=False):
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(data) if compress else data)
    return path


def read_shard(path) -> list[dict]:
    with open(path, "rb") as f:
        return [json.loads(line) for line in io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(f))]


def read_all(out_dir) -> list[dict]:
    manifest = json.loads((out_dir / "manifest.json").read_text())
    return [row for s in manifest["shards"] for row in read_shard(out_dir / s["file"])]


def numbered_inputs(folder, files=3, per_file=7):
    folder.mkdir()
    for f in range(files):
        write_jsonl(folder / f"part{f}.jsonl", [{"text": f"file {f} text {i}"} for i in range(per_file)])
    return folder


# ---- formats


def test_every_format_becomes_text_and_meta(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = tmp_path / "raw"
    raw.mkdir()
    write_jsonl(raw / "a_pile.jsonl", [{"text": "Hello\r\nworld.  ", "meta": {"pile_set_name": "Pile-CC"}}])
    (raw / "b_wudao.json").write_text(json.dumps([
        {"id": 7, "dataType": "百科", "title": "巴黎", "content": "巴黎是法国的首都。"},
        {"title": "", "content": "没有标题。"}], ensure_ascii=False), encoding="utf-8")
    write_jsonl(raw / "c_panda.jsonl.zst", [{"input": "问题：1+1？\n回答：", "target": "2。"}], compress=True)
    write_jsonl(raw / "d_alpaca.jsonl", [{"instruction": "Add.", "input": "1 and 2", "output": "3"},
                                         {"instruction": "Say hi.", "input": "", "output": "hi"}])
    (raw / "e_notes.txt").write_text("First doc\nline two\n\n\n第二篇。\n", encoding="utf-8")
    pq.write_table(pa.table({"text": ["From parquet."], "url": ["http://x"]}), raw / "f_table.parquet")
    (raw / "README.md").write_text("not an input: ignored inside a folder")

    manifest = shard_corpus([str(raw)], tmp_path / "out")
    assert read_all(tmp_path / "out") == [
        {"text": "Hello\nworld.", "meta": {"pile_set_name": "Pile-CC", "source": "raw/a_pile.jsonl", "line": 1}},
        {"text": "巴黎\n巴黎是法国的首都。",
         "meta": {"id": 7, "dataType": "百科", "title": "巴黎", "source": "raw/b_wudao.json", "item": 0}},
        {"text": "没有标题。", "meta": {"title": "", "source": "raw/b_wudao.json", "item": 1}},
        {"text": "问题：1+1？\n回答：2。", "meta": {"source": "raw/c_panda.jsonl.zst", "line": 1}},
        {"text": "Add.\n1 and 2\n3", "meta": {"source": "raw/d_alpaca.jsonl", "line": 1}},
        {"text": "Say hi.\nhi", "meta": {"source": "raw/d_alpaca.jsonl", "line": 2}},
        {"text": "First doc\nline two", "meta": {"source": "raw/e_notes.txt", "line": 1}},
        {"text": "第二篇。", "meta": {"source": "raw/e_notes.txt", "line": 5}},
        {"text": "From parquet.", "meta": {"url": "http://x", "source": "raw/f_table.parquet", "row": 0}},
    ]
    assert [i["file"] for i in manifest["inputs"]] == ["raw/a_pile.jsonl", "raw/b_wudao.json", "raw/c_panda.jsonl.zst",
                                                        "raw/d_alpaca.jsonl", "raw/e_notes.txt", "raw/f_table.parquet"]


@pytest.mark.parametrize("split,texts", [
    ("paragraph", ["a\nb", "c"]),
    ("file", ["a\nb\n\n\nc"]),
    ("line", ["a", "b", "c"]),
])
def test_txt_split(tmp_path, split, texts):
    (tmp_path / "t.txt").write_text("a\nb\n\n\nc\n")
    shard_corpus([str(tmp_path / "t.txt")], tmp_path / "out", txt_split=split)
    assert [r["text"] for r in read_all(tmp_path / "out")] == texts


def test_resharding_shards_keeps_the_first_origin(tmp_path):
    write_jsonl(tmp_path / "orig.jsonl", [{"text": "one"}, {"text": "two"}])
    shard_corpus([str(tmp_path / "orig.jsonl")], tmp_path / "first", max_lines=1)
    shard_corpus([str(tmp_path / "first")], tmp_path / "second")  # its manifest.json is not read as data
    assert read_all(tmp_path / "second") == [{"text": "one", "meta": {"source": "orig.jsonl", "line": 1}},
                                             {"text": "two", "meta": {"source": "orig.jsonl", "line": 2}}]


# ---- shards and manifest


def test_max_lines_split_and_manifest_describe_the_files(tmp_path):
    raw = numbered_inputs(tmp_path / "raw", files=2, per_file=5)
    manifest = shard_corpus([str(raw)], tmp_path / "out", max_lines=4, prefix="web")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "web-00000.jsonl.zst", "web-00001.jsonl.zst",
                                                     "web-00002.jsonl.zst"]
    assert [s["lines"] for s in manifest["shards"]] == [4, 4, 2]
    for s in manifest["shards"]:
        data = (out / s["file"]).read_bytes()
        assert s["bytes"] == len(data) and s["sha256"] == hashlib.sha256(data).hexdigest()
        assert len(read_shard(out / s["file"])) == s["lines"]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["total_lines"] == 10 and manifest["total_shards"] == 3
    assert manifest["total_bytes"] == sum(s["bytes"] for s in manifest["shards"])
    assert manifest["settings"] == {"max_lines": 4, "prefix": "web", "txt_split": "paragraph", "on_bad_line": "error",
                                    "compression_level": 3}
    assert [r["text"] for r in read_all(out)] == [f"file {f} text {i}" for f in range(2) for i in range(5)]


@pytest.mark.slow  # the script in child processes, with and without a worker pool
def test_workers_do_not_change_the_shards(tmp_path):
    raw = numbered_inputs(tmp_path / "raw", files=5, per_file=9)
    for workers in (1, 2):
        proc = run_script(SCRIPT, "--inputs", str(raw), "--out_dir", str(tmp_path / f"w{workers}"), "--max_lines=10",
                          f"--workers={workers}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "wrote 45 texts" in proc.stdout and "into 5 shards" in proc.stdout
    one, two = tmp_path / "w1", tmp_path / "w2"
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    for path in one.iterdir():
        assert path.read_bytes() == (two / path.name).read_bytes(), path.name


# ---- bad input


@pytest.mark.slow  # the script with a worker pool, in a child process
def test_bad_line_is_one_error_line_and_nothing_is_written(tmp_path):
    raw = numbered_inputs(tmp_path / "raw", files=2, per_file=3)
    with open(raw / "part1.jsonl", "a") as f:
        f.write('{"text": "fine"}\n{"text": \n')
    out = tmp_path / "out"
    shard_corpus([str(raw / "part0.jsonl")], out)  # an earlier output must survive a failed run
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = run_script(SCRIPT, "--inputs", str(raw), "--out_dir", str(out), "--workers=2", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == f"error: {raw / 'part1.jsonl'}:5: malformed JSON (Expecting value at column 10)\n"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]  # no temporary folder left behind


@pytest.mark.parametrize("row,message", [
    ({"question": "?"}, "x.jsonl:2: unrecognized record with fields ['question']; expected The Pile"),
    ({"text": 3}, "x.jsonl:2: field 'text' must be a string, got int"),
    ({"title": "t", "content": None}, "x.jsonl:2: field 'content' must be a string, got null"),
    ({"instruction": "i"}, "x.jsonl:2: missing field 'output'"),
])
def test_unusable_record_names_file_line_and_field(tmp_path, row, message):
    write_jsonl(tmp_path / "x.jsonl", [{"text": "ok"}, row])
    with pytest.raises(DataError) as e:
        shard_corpus([str(tmp_path / "x.jsonl")], tmp_path / "out")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_skip_counts_bad_lines_and_dropped_empty_texts(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"text": "a"}\nnot json\n{"text": "   "}\n["list"]\n\n{"text": "b"}\n{"content": ""}\n'
                     b'{"text": "\xff"}\n')
    manifest = shard_corpus([str(path)], tmp_path / "out", on_bad_line="skip")
    assert [r["text"] for r in read_all(tmp_path / "out")] == ["a", "b"]
    assert manifest["skipped_lines"] == 3 and manifest["empty_texts"] == 2 and manifest["total_lines"] == 2
    assert manifest["inputs"] == [{"file": "x.jsonl", "records": 2, "skipped_lines": 3, "empty_texts": 2,
                                   "text_chars": 2}]


def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    write_jsonl(tmp_path / "x.jsonl", [{"text": "a"}])
    with pytest.raises(UserError, match="exists and is not a shard folder"):
        shard_corpus([str(tmp_path / "x.jsonl")], tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_missing_and_unsupported_inputs_are_clear(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="x.csv: unsupported file type; expected one of .jsonl.zst, .jsonl"):
        shard_corpus([str(tmp_path / "x.csv")], tmp_path / "out")
    with pytest.raises(UserError, match="nope.jsonl: no such file or folder"):
        shard_corpus([str(tmp_path / "nope.jsonl")], tmp_path / "out")


# ---- the bundled sample corpus


def test_bundled_shards_match_their_manifest():
    manifest = json.loads((BUNDLED / "shards" / "manifest.json").read_text())
    assert len(manifest["shards"]) >= 3 and manifest["settings"]["max_lines"] == 512
    assert sorted(p.name for p in (BUNDLED / "shards").iterdir()) == sorted(
        ["manifest.json"] + [s["file"] for s in manifest["shards"]])
    for s in manifest["shards"]:
        data = (BUNDLED / "shards" / s["file"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (s["bytes"], s["sha256"]), s["file"]
        assert len(read_shard(BUNDLED / "shards" / s["file"])) == s["lines"] <= 512
    assert manifest["total_lines"] == sum(s["lines"] for s in manifest["shards"])
    text_bytes = sum(len(row["text"].encode()) for s in manifest["shards"]
                     for row in read_shard(BUNDLED / "shards" / s["file"]))
    assert 300_000 <= text_bytes <= 600_000


def test_bundled_corpus_regenerates_byte_for_byte(tmp_path):
    """make_pretrain_sample.py then shard_corpus.py, as in the generator's docstring, give the committed files."""
    from data_scripts.make_pretrain_sample import main as make_sample

    make_sample(["--out_dir", str(tmp_path / "raw")])
    for path in (BUNDLED / "raw").iterdir():
        assert (tmp_path / "raw" / path.name).read_bytes() == path.read_bytes(), path.name
    shard_corpus([str(tmp_path / "raw")], tmp_path / "shards", max_lines=512)
    for path in (BUNDLED / "shards").iterdir():
        assert (tmp_path / "shards" / path.name).read_bytes() == path.read_bytes(), path.name
