import hashlib

from tests.conftest import REPO, run_script

SCRIPT = REPO / "data_scripts" / "download_corpus.py"


def make_sources(tmp_path):
    src = tmp_path / "mirror"
    src.mkdir()
    (src / "a.jsonl").write_text('{"text": "a"}\n')
    (src / "b c.txt").write_bytes(b"b" * 3_000_000)  # bigger than one read chunk
    return src


def run(tmp_path, url_lines, *extra):
    (tmp_path / "urls.txt").write_text("\n".join(url_lines) + "\n")
    return run_script(SCRIPT, "--urls", str(tmp_path / "urls.txt"), "--out_dir", str(tmp_path / "raw"), *extra,
                      cwd=tmp_path)


def test_downloads_file_urls_then_skips_them(tmp_path):
    src = make_sources(tmp_path)
    sha_b = hashlib.sha256((src / "b c.txt").read_bytes()).hexdigest()
    lines = ["# corpus mirror", "", (src / "a.jsonl").as_uri(), f"{(src / 'b c.txt').as_uri()}  {sha_b}"]
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "b c.txt.part").write_bytes(b"stale half download")  # a stopped earlier run
    proc = run(tmp_path, lines)
    assert proc.returncode == 0, proc.stderr
    for name in ("a.jsonl", "b c.txt"):
        assert (tmp_path / "raw" / name).read_bytes() == (src / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["a.jsonl", "b c.txt"]
    assert proc.stdout.count("downloaded") == 2

    proc = run(tmp_path, lines)  # a second run finds everything in place
    assert proc.returncode == 0 and proc.stdout.count("exists") == 2, proc.stdout


def test_sha256_mismatch_and_missing_file_fail_without_leaving_files(tmp_path):
    src = make_sources(tmp_path)
    lines = [f"{(src / 'a.jsonl').as_uri()} {'0' * 64}", (src / "gone.jsonl").as_uri(), (src / "b c.txt").as_uri()]
    proc = run(tmp_path, lines, "--retries=1")
    assert proc.returncode == 2
    assert f"sha256 is {hashlib.sha256((src / 'a.jsonl').read_bytes()).hexdigest()}, expected {'0' * 64}" in proc.stderr
    assert "gone.jsonl" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: 2 of 3 downloads failed (listed above); run again to retry"
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["b c.txt"]  # the good one still came


def test_bad_url_file_line_is_named(tmp_path):
    proc = run(tmp_path, ["# header", "notaurl.jsonl"])
    assert proc.returncode == 2
    assert proc.stderr == (f"error: {tmp_path / 'urls.txt'}:2: 'notaurl.jsonl' is not an http(s), ftp or file:// "
                           "URL\n")
