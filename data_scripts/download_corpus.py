"""Download the raw corpus files listed in a file of URLs into a folder; safe to stop and run again.

    python data_scripts/download_corpus.py --urls my_urls.txt --out_dir /data/raw
    python data_scripts/shard_corpus.py --inputs /data/raw --out_dir /data/shards     # then shard them

The URL file has one download a line: `URL [sha256]`; blank lines and lines starting with # are ignored. A file is
saved under the last part of its URL's path. A file already in out_dir is skipped (and checked when a sha256 is
given); a download goes to <name>.part first and is renamed when complete, so a stopped run leaves no half file
under the real name, and the next run continues a .part where the server supports ranges (HTTP 206), else starts it
over. Every URL is tried; the failures are listed and the run exits 2 so a script notices. Only Python's urllib:
http, https, ftp and file:// URLs. No URLs are bundled: the corpora's licenses and mirrors are the user's choice.
"""
import argparse
import hashlib
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a standalone script: make `common` importable
from common.config import UserError, exit_on_user_error  # noqa: E402

CHUNK = 1 << 20


def read_url_list(path) -> list[tuple[str, str, str | None]]:
    """(url, file name, sha256 or None) for each line of the URL file; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--urls={path}: no such file")
    entries, names = [], {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) > 2:
            raise UserError(f"{path}:{lineno}: expected `URL [sha256]`, got {len(fields)} fields")
        url, sha = fields[0], (fields[1].lower() if len(fields) == 2 else None)
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https", "ftp", "file"):
            raise UserError(f"{path}:{lineno}: {url!r} is not an http(s), ftp or file:// URL")
        name = Path(urllib.parse.unquote(parsed.path)).name
        if not name:
            raise UserError(f"{path}:{lineno}: {url} has no file name at the end of its path")
        if sha is not None and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)):
            raise UserError(f"{path}:{lineno}: {sha!r} is not a sha256 (64 hex digits)")
        if name in names:
            raise UserError(f"{path}:{lineno}: {url} would be saved as '{name}', like the URL on line {names[name]}")
        names[name] = lineno
        entries.append((url, name, sha))
    if not entries:
        raise UserError(f"--urls={path}: no URLs in this file")
    return entries


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_to_part(url: str, part: Path, timeout: float):
    """Download url into part, continuing it when the server honours a Range request."""
    from tqdm import tqdm

    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        resumed = have and getattr(response, "status", None) == 206
        length = response.headers.get("Content-Length")
        total = (int(length) + (have if resumed else 0)) if length else None
        with open(part, "ab" if resumed else "wb") as f, tqdm(
                total=total, initial=have if resumed else 0, unit="B", unit_scale=True, desc=part.name[:-5],
                disable=None) as bar:
            for block in iter(lambda: response.read(CHUNK), b""):
                f.write(block)
                bar.update(len(block))


def download(url: str, target: Path, sha: str | None, retries: int, timeout: float) -> str:
    """Bring one file into place; returns what happened ("exists", "downloaded")."""
    if target.exists():
        if sha and file_sha256(target) != sha:
            raise UserError(f"{target} exists but its sha256 is not {sha}; delete it to download it again")
        return "exists"
    part = target.with_name(target.name + ".part")
    for attempt in range(1, retries + 1):
        try:
            fetch_to_part(url, part, timeout)
            break
        except (urllib.error.URLError, OSError) as e:  # network trouble: the .part stays, the next try continues
            if attempt == retries:
                reason = getattr(e, "reason", None) or e
                raise UserError(f"{url}: {reason} (after {retries} tries; run again to continue)") from None
            time.sleep(min(2 ** attempt, 30))
    if sha:
        got = file_sha256(part)
        if got != sha:
            part.unlink()
            raise UserError(f"{url}: sha256 is {got}, expected {sha}; the download was deleted")
    os.replace(part, target)
    return "downloaded"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--urls", required=True, help="a text file: one `URL [sha256]` a line")
    p.add_argument("--out_dir", required=True, help="where the files go")
    p.add_argument("--retries", type=int, default=3, help="tries per URL before it counts as failed")
    p.add_argument("--timeout", type=float, default=60, help="seconds without data before a try fails")
    args = p.parse_args(argv)
    with exit_on_user_error():
        entries = read_url_list(args.urls)
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        failures = []
        for url, name, sha in entries:
            try:
                outcome = download(url, out / name, sha, max(1, args.retries), args.timeout)
                print(f"{outcome:<10} {out / name}")
            except UserError as e:
                print(f"failed     {e}", file=sys.stderr)
                failures.append(url)
        if failures:
            raise UserError(f"{len(failures)} of {len(entries)} downloads failed (listed above); run again to retry")
    print(f"all {len(entries)} files are in {out}")


if __name__ == "__main__":
    main()
