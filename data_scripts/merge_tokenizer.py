"""Extend a Llama SentencePiece tokenizer with the pieces of another one (e.g. Chinese), keeping every old id.

    python data_scripts/train_tokenizer.py --inputs /data/zh_shards --vocab_size 20000 --normalization identity \
        --out_dir zh_tokenizer
    python data_scripts/merge_tokenizer.py --base_tokenizer /models/Llama-2-7b-hf --add_tokenizer zh_tokenizer \
        --out_dir llama2_zh_tokenizer
    python data_scripts/merge_tokenizer.py --base_tokenizer common/tiny_llama --add_tokenizer zh_tokenizer \
        --out_dir /tmp/tiny_zh_tokenizer                                   # the tiny test tokenizer, seconds

The base is a Llama 1/2 style tokenizer folder with tokenizer.model (SentencePiece); a tokenizer.json-only one
(Llama 3, tiktoken-style BPE) has no SentencePiece model to extend and is refused. The pieces of --add_tokenizer (a
folder with tokenizer.model, or a .model file) that the base lacks are appended after the base's last id, in the
order of the added model, so ids 0..old_size-1 mean what they meant before and a model trained on the base keeps
its embeddings (resize them: model.resize_token_embeddings(len(tokenizer)), then train the new rows). The appended
pieces score below every base piece, so the base's own merges keep priority. Train the added model with the base's
normalization (Llama 1/2: --normalization identity) so its pieces match text as the base sees it.
out_dir gets tokenizer.model, tokenizer.json and the base's tokenizer_config.json / special tokens / chat template;
it loads with AutoTokenizer.from_pretrained. Written atomically (built beside out_dir, then renamed).
"""
import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a standalone script: make `common` importable
from common.config import UserError, exit_on_user_error  # noqa: E402

CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")  # tokenizer.json is rebuilt


def load_sentencepiece_proto(path: Path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf's DecodeError: not a SentencePiece model
        raise UserError(f"{path}: not a SentencePiece model ({e})") from None
    if not proto.pieces:
        raise UserError(f"{path}: not a SentencePiece model (no pieces)")
    return proto


def base_model_file(folder: str) -> Path:
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"--base_tokenizer={folder}: no such folder; expected a Llama tokenizer or model folder")
    if not (path / "tokenizer.model").is_file():
        kind = "it has only tokenizer.json (Llama 3 / tiktoken-style BPE)" if (path / "tokenizer.json").is_file() \
            else "it has no tokenizer files"
        raise UserError(f"--base_tokenizer={folder}: no tokenizer.model, {kind}; merging needs a SentencePiece "
                        "tokenizer (Llama 1/2 style); for other tokenizers add tokens with tokenizer.add_tokens")
    return path / "tokenizer.model"


def add_model_file(name: str) -> Path:
    path = Path(name)
    if path.is_dir():
        path = path / "tokenizer.model"
    if not path.is_file():
        raise UserError(f"--add_tokenizer={name}: no tokenizer.model there; expected a SentencePiece .model file or "
                        "a folder from data_scripts/train_tokenizer.py")
    return path


def merge_pieces(base, extra) -> list[str]:
    """Append to `base` (a ModelProto, changed in place) the normal and user-defined pieces of `extra` it lacks."""
    from sentencepiece import sentencepiece_model_pb2

    Piece = sentencepiece_model_pb2.ModelProto.SentencePiece
    model_type = base.trainer_spec.ModelType.Name
    if base.trainer_spec.model_type != extra.trainer_spec.model_type:
        raise UserError(f"the base is a {model_type(base.trainer_spec.model_type)} model, the added one "
                        f"{model_type(extra.trainer_spec.model_type)}; train the added tokenizer with the same model "
                        "type (train_tokenizer.py trains BPE, like Llama 1/2)")
    have = {p.piece for p in base.pieces}
    lowest = min(p.score for p in base.pieces)
    added = []
    for p in extra.pieces:
        if p.type in (Piece.NORMAL, Piece.USER_DEFINED) and p.piece not in have:
            # below every base score: the base's merges (and so its tokenization of text it already covers) win
            base.pieces.append(Piece(piece=p.piece, score=lowest - 1 - len(added), type=p.type))
            have.add(p.piece)
            added.append(p.piece)
    base.trainer_spec.vocab_size = len(base.pieces)
    return added


def merge_tokenizer(base_folder: str, add_tokenizer: str, out_dir: str) -> dict:
    base_file, add_file = base_model_file(base_folder), add_model_file(add_tokenizer)
    base, extra = load_sentencepiece_proto(base_file), load_sentencepiece_proto(add_file)
    from transformers import AutoTokenizer, LlamaTokenizer  # after the checks: a mistake is reported in a blink
    old_size = len(base.pieces)
    base_tokenizer = AutoTokenizer.from_pretrained(base_folder)
    if len(base_tokenizer) != old_size:
        raise UserError(f"--base_tokenizer={base_folder}: {len(base_tokenizer)} tokens but tokenizer.model has "
                        f"{old_size}: tokens added outside the SentencePiece model would collide with the appended "
                        "pieces' ids; merge into the tokenizer before tokens were added to it")
    if base.normalizer_spec.name != extra.normalizer_spec.name:
        print(f"note: the base normalizes text with {base.normalizer_spec.name!r}, the added model with "
              f"{extra.normalizer_spec.name!r}; some added pieces may never match (train it with --normalization "
              f"{base.normalizer_spec.name})")
    added = merge_pieces(base, extra)

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        (tmp / "tokenizer.model").write_bytes(base.SerializeToString())
        for name in CONFIG_FILES:
            if (Path(base_folder) / name).is_file():
                shutil.copy(Path(base_folder) / name, tmp / name)
        # no tokenizer.json in tmp: transformers builds it from the merged tokenizer.model
        add_bos, add_eos = special_tokens_added(base_tokenizer)
        merged = LlamaTokenizer.from_pretrained(str(tmp), add_bos_token=add_bos, add_eos_token=add_eos)
        merged.save_pretrained(str(tmp))
        check_old_ids_kept(base_tokenizer, AutoTokenizer.from_pretrained(str(tmp)), old_size, len(base.pieces))
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"old_size": old_size, "new_size": len(base.pieces), "added": added}


def special_tokens_added(tokenizer) -> tuple[bool, bool]:
    """Whether the tokenizer puts BOS before and EOS after a text, seen by encoding one (its config may not say)."""
    plain = tokenizer("a", add_special_tokens=False).input_ids
    full = tokenizer("a").input_ids
    start = full.index(plain[0]) if plain and plain[0] in full else 0
    return (start > 0 and full[0] == tokenizer.bos_token_id,
            len(full) > start + len(plain) and full[-1] == tokenizer.eos_token_id)


def check_old_ids_kept(old_tokenizer, new_tokenizer, old_size: int, new_size: int):
    """The saved tokenizer must map every old id to the same piece and have exactly the merged size."""
    old_ids = list(range(old_size))
    if new_tokenizer.convert_ids_to_tokens(old_ids) != old_tokenizer.convert_ids_to_tokens(old_ids):
        raise RuntimeError("the merged tokenizer changed the pieces of old ids; please report this")
    if len(new_tokenizer) != new_size:
        raise RuntimeError(f"the merged tokenizer has {len(new_tokenizer)} tokens, expected {new_size}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base_tokenizer", required=True,
                   help="a Llama 1/2 tokenizer or model folder (with tokenizer.model)")
    p.add_argument("--add_tokenizer", required=True, help="a SentencePiece .model, or a train_tokenizer.py folder")
    p.add_argument("--out_dir", required=True, help="where the merged tokenizer goes (replaced if there)")
    args = p.parse_args(argv)
    with exit_on_user_error():
        result = merge_tokenizer(args.base_tokenizer, args.add_tokenizer, args.out_dir)
    added = result["added"]
    print(f"old vocab size {result['old_size']:,}, new vocab size {result['new_size']:,} "
          f"(+{len(added):,} pieces{', e.g. ' + ' '.join(added[:8]) if added else ''}) -> {args.out_dir}")
    print(f"before training on it: model.resize_token_embeddings({result['new_size']})")


if __name__ == "__main__":
    main()
