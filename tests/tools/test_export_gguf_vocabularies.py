"""tools/export_gguf.py's tokenizer fields against llama.cpp's own test vocabularies (ggml-vocab-*.gguf, the files
llama.cpp's tokenizer tests run on): a small random Llama with the Llama 2 (SentencePiece), Llama 3 or Qwen2 (byte-
level BPE) tokenizer is exported, and the file's tokens, token types, merges and pre-tokenizer name equal those of
the reference file; the SentencePiece scores order the merges as the reference's do, and transformers reads them
back to the source tokenizer's ids."""
import gguf
import pytest
import torch

from tests.common.test_data_tokenizer_families import FAMILIES, REFERENCE_TEXTS, tokenizers, vocab_dir, vocab_folders
from tests.tools.conftest import load_tool

export = load_tool("export_gguf")
__all__ = ["tokenizers", "vocab_dir", "vocab_folders"]  # session fixtures shared with the tokenizer-family tests


def fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items() if name.startswith("tokenizer.ggml.")}


@pytest.fixture(scope="module")
def exported(tokenizers, tmp_path_factory) -> dict:
    """Each family's tokenizer on a 1-layer random Llama of its vocabulary size, exported to f16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    files = {}
    for family in ("llama2", "llama3", "qwen2"):
        folder = tmp_path_factory.mktemp(family)
        tokenizer = tokenizers[family]
        config = LlamaConfig(vocab_size=FAMILIES[family]["size"], hidden_size=32, intermediate_size=64,
                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        files[family] = export.export_gguf(str(folder), str(folder / f"{family}.gguf"), prompt_template="chat")["out"]
    return files


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama2", "llama3", "qwen2"])
def test_exported_tokenizer_fields_are_llama_cpp_s_own(family, exported, vocab_dir):
    ours = fields(exported[family])
    reference = fields(vocab_dir / f"ggml-vocab-{FAMILIES[family]['vocab']}.gguf")
    for key in ("model", "tokens", "token_type", "merges", "pre", "bos_token_id", "eos_token_id"):
        assert ours.get(f"tokenizer.ggml.{key}") == reference.get(f"tokenizer.ggml.{key}"), key
    if family == "llama2":  # every token made by a merge ranks as the reference's scores rank it
        ours_scores, reference_scores = ours["tokenizer.ggml.scores"], reference["tokenizer.ggml.scores"]
        merged = [i for i, s in enumerate(ours_scores) if s < 0]
        assert len(merged) > 29000  # of 32,000: all but single characters, bytes and specials
        # the reference ties its 15 runs of spaces at -1e9 (merged left to right); ours puts them last as well
        ranked = [i for i in merged if reference_scores[i] > -1e9]
        assert len(merged) - len(ranked) == 15
        assert sorted(ranked, key=lambda i: -ours_scores[i]) == sorted(ranked, key=lambda i: -reference_scores[i])
        assert max(ours_scores[i] for i in merged if i not in ranked) < min(ours_scores[i] for i in ranked)


@pytest.mark.slow
def test_transformers_reads_the_exported_sentencepiece_scores_to_the_same_ids(exported, tokenizers):
    """Llama 2's scores are ours (the merge ranks), not the reference's: read back, they tokenize as the source does.
    (Llama 3's and Qwen2's fields equal the reference files', which the source tokenizers were read from.)"""
    from transformers import AutoTokenizer

    path = exported["llama2"]
    back = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in REFERENCE_TEXTS:
        assert back(text, add_special_tokens=False).input_ids == \
            tokenizers["llama2"](text, add_special_tokens=False).input_ids, text
