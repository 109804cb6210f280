"""Train a SentencePiece BPE tokenizer on local text and save it as a Hugging Face Llama tokenizer folder.

    python data_scripts/train_tokenizer.py --inputs data/sft/*.jsonl --vocab_size 2048 --out_dir my_tokenizer
    python data_scripts/train_tokenizer.py --inputs data/pretrain/shards --vocab_size 8000 --out_dir zh_tokenizer
    python data_scripts/train_tokenizer.py --inputs /data/shards/manifest.json --vocab_size 32000 \
        --max_sentences 5000000 --out_dir /models/my_tokenizer      # a big corpus: sample 5M lines

Inputs: shard folders or their manifest.json (data_scripts/shard_corpus.py output: the shards it lists), other folders
(their .txt/.jsonl/.jsonl.zst/.json files), and files: .txt (one text a line), .jsonl / .jsonl.zst / .json (a
record's "text" field when it has one, as shards and The Pile do; otherwise every string value of the record).
Every non-blank line of every text is one SentencePiece sentence. --character_coverage 0.9995 (the default) suits
CJK-heavy text (the rarest characters fall back to bytes); 1.0 suits small alphabets.
The folder holds tokenizer.model (SentencePiece), tokenizer.json and tokenizer_config.json; it loads with
AutoTokenizer.from_pretrained as a LlamaTokenizer: <unk> 0, <s> 1 (BOS, added), </s> 2 (EOS), <pad> 3 (not EOS), and
byte fallback for unseen characters (--byte_fallback, on by default). To add its pieces to an existing Llama
tokenizer, see data_scripts/merge_tokenizer.py.
The vocabulary of the tiny test model (common/tiny_llama) was made with the command in common/tiny_llama/README.md.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a standalone script: make `common` importable
from common.config import UserError, exit_on_user_error, parse_bool  # noqa: E402
from common.data import read_records  # noqa: E402

TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.zst", ".json")
STALE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
               "chat_template.jinja")
MAX_SENTENCE_BYTES = 1 << 14  # SentencePiece skips longer lines; its default (4192) would drop long CJK paragraphs


def iter_strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from iter_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from iter_strings(v)


def record_strings(record: dict):
    """A record's text: its "text" field (shards, The Pile), else every string in it (SFT records, chat)."""
    if isinstance(record.get("text"), str):
        yield record["text"]
    else:
        yield from iter_strings(record)


def manifest_shards(manifest: Path) -> list[str]:
    try:
        shards = json.loads(manifest.read_text(encoding="utf-8"))["shards"]
        return [str(manifest.parent / shard["file"]) for shard in shards]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{manifest}: not a shard_corpus.py manifest (expected "
                        '{"shards": [{"file": ...}, ...]})') from None


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files to read: a manifest gives its shards, a folder its manifest's shards or else its text files."""
    files = []
    for name in inputs:
        path = Path(name)
        if path.is_dir() and (path / "manifest.json").is_file():
            files += manifest_shards(path / "manifest.json")
        elif path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
            if not found:
                raise UserError(f"{name}: no {', '.join(TEXT_SUFFIXES)} files in this folder")
            files += found
        elif path.name == "manifest.json" and path.is_file():
            files += manifest_shards(path)
        elif not path.is_file():
            raise UserError(f"{name}: no such file or folder")
        elif not name.endswith(TEXT_SUFFIXES):
            raise UserError(f"{name}: unsupported file type; expected {', '.join(TEXT_SUFFIXES)}, a shard folder "
                            "or its manifest.json")
        else:
            files.append(name)
    return files


def write_corpus(inputs, extra_text_files, path):
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for name in inputs:
            if name.endswith(".txt"):
                texts = Path(name).read_text(encoding="utf-8").splitlines()
            else:
                texts = [s for rec in read_records(name) for s in record_strings(rec.data)]
            for text in texts:
                for line in text.splitlines():
                    if line.strip():
                        f.write(line + "\n")
                        n += 1
        for name in extra_text_files:
            f.write(Path(name).read_text(encoding="utf-8"))
    return n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", nargs="+", required=True,
                   help="text or json(l)(.zst) files, shard folders or manifest.json, folders of text files")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--vocab_size", type=int, default=32000)
    p.add_argument("--character_coverage", type=float, default=0.9995, help="0.9995 for CJK-rich text, 1.0 for Latin")
    p.add_argument("--byte_fallback", type=parse_bool, nargs="?", const=True, default=True,
                   help="unseen characters become UTF-8 byte pieces instead of <unk> (default true)")
    p.add_argument("--normalization", default="nmt_nfkc",
                   choices=("nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf", "identity"),
                   help="SentencePiece text normalization; identity (as Llama 1/2) for pieces to merge into Llama")
    p.add_argument("--user_symbols", default="",
                   help="comma-separated pieces kept whole, e.g. '<|user|>,<|assistant|>'")
    p.add_argument("--max_sentences", type=int, default=0,
                   help="train on a random sample of this many lines (0: all); a few million is plenty")
    p.add_argument("--extra_text_files", nargs="*", default=[], help="text added verbatim to the corpus (templates)")
    p.add_argument("--chat_template_file", default=None, help="a Jinja chat template to store with the tokenizer")
    args = p.parse_args(argv)

    with exit_on_user_error():
        if args.vocab_size < 260 and args.byte_fallback:
            raise UserError(f"--vocab_size={args.vocab_size}: byte fallback alone takes 256 pieces plus 4 special "
                            "ones; expected at least a few hundred more")
        if not 0 < args.character_coverage <= 1:
            raise UserError(f"--character_coverage={args.character_coverage}: expected a fraction in (0, 1]")
        if args.max_sentences < 0:
            raise UserError(f"--max_sentences={args.max_sentences}: expected 0 (all) or a positive count")
        inputs = expand_inputs(args.inputs)
        train_tokenizer(inputs, args)


def train_tokenizer(inputs, args):
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    chat_template = Path(args.chat_template_file).read_text(encoding="utf-8") if args.chat_template_file else None
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        n = write_corpus(inputs, args.extra_text_files, corpus)
        if n == 0:
            raise UserError(f"no text in the {len(inputs)} input files")
        print(f"corpus: {n} lines from {len(inputs)} files"
              + (f", sampling {args.max_sentences:,}" if 0 < args.max_sentences < n else ""))
        spm.set_random_generator_seed(0)  # the --max_sentences sample, and so the vocabulary, is reproducible
        spm.SentencePieceTrainer.train(
            input=corpus, model_prefix=os.path.join(tmp, "tokenizer"), model_type="bpe",
            vocab_size=args.vocab_size, hard_vocab_limit=False, character_coverage=args.character_coverage,
            normalization_rule_name=args.normalization, byte_fallback=args.byte_fallback, split_digits=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            user_defined_symbols=[s for s in args.user_symbols.split(",") if s],
            input_sentence_size=args.max_sentences, shuffle_input_sentence=True,
            max_sentence_length=MAX_SENTENCE_BYTES, num_threads=os.cpu_count() or 1, minloglevel=2,
        )
        shutil.copy(os.path.join(tmp, "tokenizer.model"), out / "tokenizer.model")
    for stale in STALE_FILES:  # an earlier tokenizer's files in out_dir would be loaded instead of the new model
        (out / stale).unlink(missing_ok=True)
    tok = LlamaTokenizer.from_pretrained(str(out), add_bos_token=True, add_eos_token=False, pad_token="<pad>")
    if chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(str(out))
    print(f"saved a {len(tok)}-piece tokenizer to {out}")


if __name__ == "__main__":
    main()
