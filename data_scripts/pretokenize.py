"""Tokenize a corpus of text shards once into a flat token file for pretraining: every document as BOS + tokens +
EOS, end to end, in uint16 (vocabularies up to 65,536) or uint32, memory-mapped by the pretrain recipes.

    python data_scripts/pretokenize.py --data_path=data/pretrain/shards --tokenizer_path=tiny --out=/data/tokens.bin
    bash pretrain/deepspeed/run.sh --data_path=/data/tokens.bin

--data_path: a folder of .jsonl.zst / .jsonl shards (with its manifest.json if there is one), a manifest, or one
file; every record's --text_field is a document. Writes out (tokens) and out with .json (dtype, token and document
counts, vocabulary size, BOS/EOS ids, the tokenizer and the shards it came from), both atomically. Tokenizing runs in
--workers processes, one shard at a time each; the result is the same for any number of workers.
"""
import argparse
import json
import os
import sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a standalone script: make `common` importable
from common.config import UserError, exit_on_user_error  # noqa: E402
from common.model import load_tokenizer, materialize_tiny_llama  # noqa: E402
from common.pretrain_data import encode_document, list_shards, slot_documents  # noqa: E402

_tokenizer = None


def _init_worker(tokenizer_dir: str):
    global _tokenizer
    _tokenizer = load_tokenizer(Path(tokenizer_dir))


def _tokenize_shard(job) -> tuple[np.ndarray, int]:
    shard, text_field, dtype = job
    ids, docs = [], 0
    for text in slot_documents([Path(shard)], 0, 1, text_field):
        ids += encode_document(_tokenizer, text)
        docs += 1
    return np.asarray(ids, dtype=dtype), docs


def pretokenize(data_path, tokenizer_dir: Path, out: Path, text_field="text", workers=1) -> dict:
    """Tokenize every document of the shards under data_path into `out` (+ its .json); returns the metadata."""
    out = Path(out)
    if out.suffix != ".bin":
        raise UserError(f"--out={out}: expected a .bin file name (the metadata goes beside it as .json)")
    shards = list_shards(data_path)
    tokenizer = load_tokenizer(tokenizer_dir)
    vocab = len(tokenizer)
    dtype = np.uint16 if vocab <= 2 ** 16 else np.uint32
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    n_tokens = n_docs = 0
    jobs = [(str(s), text_field, dtype) for s in shards]
    try:
        with open(tmp, "wb") as f, Pool(max(1, workers), _init_worker, (str(tokenizer_dir),)) as pool:
            for ids, docs in pool.imap(_tokenize_shard, jobs):  # imap keeps shard order
                f.write(ids.tobytes())
                n_tokens, n_docs = n_tokens + len(ids), n_docs + docs
        if n_docs == 0:
            raise UserError(f"{data_path}: no documents in {len(shards)} shard(s)")
        meta = {"dtype": np.dtype(dtype).name, "tokens": n_tokens, "documents": n_docs, "vocab_size": vocab,
                "bos_id": tokenizer.bos_token_id, "eos_id": tokenizer.eos_token_id, "tokenizer": str(tokenizer_dir),
                "text_field": text_field, "shards": [str(s) for s in shards]}
        meta_tmp = tmp.with_suffix(".json.tmp")
        meta_tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, out)
        os.replace(meta_tmp, out.with_suffix(".json"))  # written last: a .bin without its .json is never used
    finally:
        for leftover in (tmp, tmp.with_suffix(".json.tmp")):
            leftover.unlink(missing_ok=True)
    return meta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", required=True, help="folder of shards, a manifest.json or one .jsonl(.zst) file")
    p.add_argument("--tokenizer_path", default="tiny", help="tokenizer folder, or 'tiny' (the test Llama's)")
    p.add_argument("--out", required=True, help="token file to write, e.g. tokens.bin (metadata: tokens.json)")
    p.add_argument("--text_field", default="text", help="record field holding a document's text")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) - 1), help="tokenizing processes")
    args = p.parse_args(argv)
    with exit_on_user_error():
        tokenizer_dir = materialize_tiny_llama() if args.tokenizer_path == "tiny" else Path(args.tokenizer_path)
        if not tokenizer_dir.is_dir():
            raise UserError(f"--tokenizer_path={args.tokenizer_path}: no such folder")
        meta = pretokenize(args.data_path, tokenizer_dir, Path(args.out), args.text_field, args.workers)
    print(f"{meta['documents']:,} documents, {meta['tokens']:,} tokens ({meta['dtype']}, vocabulary "
          f"{meta['vocab_size']:,}) from {len(meta['shards'])} shard(s) -> {args.out}")


if __name__ == "__main__":
    main()
