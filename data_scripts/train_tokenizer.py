"""Train a SentencePiece BPE tokenizer on local text and save it as a Hugging Face Llama tokenizer folder.

    python data_scripts/train_tokenizer.py --inputs data/sft/*.jsonl --vocab_size 2048 --out_dir my_tokenizer

Inputs: .txt (one text a line), .jsonl / .jsonl.zst / .json (every string value of every record is text).
The folder holds tokenizer.model (SentencePiece), tokenizer.json and tokenizer_config.json; it loads with
AutoTokenizer.from_pretrained, adds BOS, has a <pad> token that is not EOS, and byte fallback for unseen characters.
The vocabulary of the tiny test model (common/tiny_llama) was made with the command in common/tiny_llama/README.md.
"""
import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a standalone script: make `common` importable
from common.data import read_records  # noqa: E402


def iter_strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from iter_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from iter_strings(v)


def write_corpus(inputs, extra_text_files, path):
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for name in inputs:
            if name.endswith(".txt"):
                texts = Path(name).read_text(encoding="utf-8").splitlines()
            else:
                texts = [s for rec in read_records(name) for s in iter_strings(rec.data)]
            for text in texts:
                for line in text.splitlines():
                    if line.strip():
                        f.write(line + "\n")
                        n += 1
        for name in extra_text_files:
            f.write(Path(name).read_text(encoding="utf-8"))
    return n


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", nargs="+", required=True, help="text or json(l)(.zst) files")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--vocab_size", type=int, default=32000)
    p.add_argument("--character_coverage", type=float, default=0.9995, help="0.9995 for CJK-rich text, 1.0 for Latin")
    p.add_argument("--user_symbols", default="", help="comma-separated pieces kept whole, e.g. '<|user|>,<|assistant|>'")
    p.add_argument("--extra_text_files", nargs="*", default=[], help="text added verbatim to the corpus (templates)")
    p.add_argument("--chat_template_file", default=None, help="a Jinja chat template to store with the tokenizer")
    args = p.parse_args()

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        n = write_corpus(args.inputs, args.extra_text_files, corpus)
        print(f"corpus: {n} lines from {len(args.inputs)} files")
        spm.SentencePieceTrainer.train(
            input=corpus, model_prefix=os.path.join(tmp, "tokenizer"), model_type="bpe",
            vocab_size=args.vocab_size, hard_vocab_limit=False, character_coverage=args.character_coverage,
            byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            user_defined_symbols=[s for s in args.user_symbols.split(",") if s],
            num_threads=os.cpu_count() or 1, minloglevel=2,
        )
        shutil.copy(os.path.join(tmp, "tokenizer.model"), out / "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(str(out), add_bos_token=True, add_eos_token=False, pad_token="<pad>")
    if args.chat_template_file:
        tok.chat_template = Path(args.chat_template_file).read_text(encoding="utf-8")
    tok.save_pretrained(str(out))
    print(f"saved a {len(tok)}-piece tokenizer to {out}")


if __name__ == "__main__":
    main()
