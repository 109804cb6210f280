"""train_tokenizer.py on the bundled shards, merge_tokenizer.py into the tiny test tokenizer."""
import shutil

import pytest

from tests.conftest import REPO, run_script

pytestmark = pytest.mark.slow  # every test trains or merges a tokenizer in a child process (5-40 s each)

TRAIN = REPO / "data_scripts" / "train_tokenizer.py"
MERGE = REPO / "data_scripts" / "merge_tokenizer.py"
TINY = REPO / "common" / "tiny_llama"
SHARDS = REPO / "data" / "pretrain" / "shards"
ENGLISH = "The capital of France is Paris. Honestly, this movie felt great."
CHINESE = "我觉得酒店非常好。昨天的音乐会太无聊。"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "zh_en"
    proc = run_script(TRAIN, "--inputs", str(SHARDS), "--vocab_size=1500", f"--out_dir={out}", cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "corpus: " in proc.stdout and "lines from 4 files" in proc.stdout
    return out


@pytest.fixture(scope="module")
def merged(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "tiny_zh"
    proc = run_script(MERGE, f"--base_tokenizer={TINY}", f"--add_tokenizer={trained}", f"--out_dir={out}", cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


def test_trained_tokenizer_loads_as_llama_and_round_trips(trained):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(trained)
    assert type(tok).__name__.startswith("LlamaTokenizer") and len(tok) == 1500
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "</s>", "<pad>")
    assert tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<pad>"]) == [0, 1, 2, 3]
    for text in (ENGLISH, CHINESE):
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok(CHINESE).input_ids) < len(CHINESE) / 2  # Chinese words became pieces, not characters


def test_byte_fallback_spells_an_unseen_character_in_bytes(trained):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(trained)
    text = "a llama 🦙 and 龘"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids
    assert tok.convert_ids_to_tokens(ids).count("<0xF0>") == 1  # the emoji's first UTF-8 byte
    assert tok.decode(ids) == text


def test_trained_from_manifest_with_sampling(tmp_path):
    out = tmp_path / "tok"
    proc = run_script(TRAIN, "--inputs", str(SHARDS / "manifest.json"), "--vocab_size=600", "--max_sentences=2000",
                      "--byte_fallback=false", "--character_coverage=1.0", f"--out_dir={out}", cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "sampling 2,000" in proc.stdout
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert "<0xF0>" not in tok.get_vocab()  # no byte pieces without byte fallback


def test_tiny_tokenizer_command_still_reproduces_it(tmp_path):
    """The command in common/tiny_llama/README.md (the script's original CLI) gives the same vocabulary."""
    from common.data import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT

    (tmp_path / "templates.txt").write_text((ALPACA_PROMPT + "\n" + ALPACA_PROMPT_NO_INPUT + "\n") * 50)
    data = REPO / "data"
    proc = run_script(TRAIN, "--inputs", *(str(data / p) for p in ("sft/train.jsonl", "sft/eval.jsonl",
                      "sft/chat.jsonl", "sft/panda.jsonl", "synthetic/reverse_train.jsonl")),
                      "--extra_text_files", str(tmp_path / "templates.txt"), "--vocab_size", "2048",
                      "--user_symbols", "<|system|>,<|user|>,<|assistant|>", "--chat_template_file",
                      str(TINY / "chat_template.jinja"), "--out_dir", str(tmp_path / "tok"), cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "tok" / name).read_bytes() == (TINY / name).read_bytes(), name


def test_merge_keeps_old_ids_and_appends_new_pieces(merged, trained):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    out, stdout = merged
    old, new = AutoTokenizer.from_pretrained(TINY), AutoTokenizer.from_pretrained(out)
    old_sp, new_sp = (spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model")) for d in (TINY, out))
    added_sp = spm.SentencePieceProcessor(model_file=str(trained / "tokenizer.model"))
    n_old = len(old)
    assert f"old vocab size {n_old:,}, new vocab size {len(new):,}" in stdout
    assert len(new) == new_sp.get_piece_size() > n_old
    assert [new_sp.id_to_piece(i) for i in range(n_old)] == [old_sp.id_to_piece(i) for i in range(n_old)]
    assert new.convert_ids_to_tokens(list(range(n_old))) == old.convert_ids_to_tokens(list(range(n_old)))
    new_pieces = [new_sp.id_to_piece(i) for i in range(n_old, len(new))]
    old_pieces = {old_sp.id_to_piece(i) for i in range(n_old)}
    assert not old_pieces & set(new_pieces) and len(set(new_pieces)) == len(new_pieces)
    assert set(new_pieces) <= {added_sp.id_to_piece(i) for i in range(added_sp.get_piece_size())}
    # the base's special tokens, chat template and BOS behaviour carry over
    assert (new.bos_token, new.eos_token, new.pad_token, new.pad_token_id) == ("<s>", "</s>", "<pad>", old.pad_token_id)
    assert new.chat_template == old.chat_template
    for text in (ENGLISH, CHINESE):
        ids = new(text).input_ids
        assert ids == [new.bos_token_id] + new_sp.encode(text)  # transformers' tokenizer.json agrees with the .model
        assert new.decode(ids, skip_special_tokens=True) == text
    assert len(new(CHINESE).input_ids) < len(old(CHINESE).input_ids) / 3  # the point of merging


def test_merge_refuses_a_tokenizer_without_sentencepiece_model(tmp_path, trained):
    llama3_like = tmp_path / "llama3"
    llama3_like.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY / name, llama3_like / name)
    proc = run_script(MERGE, f"--base_tokenizer={llama3_like}", f"--add_tokenizer={trained}",
                      f"--out_dir={tmp_path / 'out'}", cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr == (f"error: --base_tokenizer={llama3_like}: no tokenizer.model, it has only tokenizer.json "
                           "(Llama 3 / tiktoken-style BPE); merging needs a SentencePiece tokenizer (Llama 1/2 style); "
                           "for other tokenizers add tokens with tokenizer.add_tokens\n")
    assert not (tmp_path / "out").exists()
