"""The SFT data flow and the generation stop ids with the real tokenizers of four families, no hub needed.

llama-cpp-python's source distribution carries llama.cpp's test vocabularies (vendor/llama.cpp/models/
ggml-vocab-*.gguf) with reference tokenizations (.inp/.out). The session fixture downloads it once with pip into
common.model.cache_dir()/downloads, extracts only the files used into cache_dir()/vocab, and keeps each vocabulary
converted to tokenizer.json (reading the gguf takes 10-60 s per vocabulary; the converted copy under a second).
- Llama 2: ggml-vocab-llama-spm (SentencePiece, 32,000, BOS added), no chat template: the Llama-2-chat [INST]
  template is written here for the chat path.
- Mistral: no Mistral vocabulary ships there; Mistral 7B v0.1's tokenizer is the Llama 2 SentencePiece vocabulary,
  so llama-spm with Mistral's [INST] template written here.
- Llama 3: ggml-vocab-llama-bpe (BPE, 128,256). The gguf load has neither the BOS post-processor nor the chat
  template of the real tokenizer: both are set here (add_bos_token=True as Meta's tokenizer.json does with its
  TemplateProcessing, and the Llama 3 Instruct template).
- Qwen2: ggml-vocab-qwen2 (151,936), its ChatML template from the gguf, pad = eos = <|endoftext|>, no BOS added.
"""
import copy
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from common.data import IGNORE_INDEX, Record, build_sft_examples, collate_left_padded, end_of_turn_ids
from common.inference import encode_prompt, generation_prompt, make_generation_config, stop_token_ids
from common.model import cache_dir, load_tokenizer
from tests.conftest import REPO, run_script
from tests.tools.conftest import load_tool

SDIST_SPEC = "llama-cpp-python==0.3.36"
SDIST_FILE = "llama_cpp_python-0.3.36.tar.gz"
VOCABS = ("llama-spm", "llama-bpe", "qwen2")

# Llama-2-chat's (tokenizer_config.json of meta-llama/Llama-2-7b-chat-hf): BOS before every [INST]
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
MISTRAL_TEMPLATE = (  # Mistral-7B-Instruct-v0.1's: one BOS, replies end with EOS
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
LLAMA3_TEMPLATE = (  # Meta-Llama-3-8B-Instruct's: BOS once, every turn ends with <|eot_id|>
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# What each family is (the real models' ids); pad: what common.model.ensure_pad_token picks, or the tokenizer's own
FAMILIES = {
    "llama2": {"vocab": "llama-spm", "size": 32000, "bos": ("<s>", 1), "eos": ("</s>", 2), "pad": ("<unk>", 0),
               "eot": ("</s>", 2)},
    "mistral": {"vocab": "llama-spm", "size": 32000, "bos": ("<s>", 1), "eos": ("</s>", 2), "pad": ("<unk>", 0),
                "eot": ("</s>", 2)},
    "llama3": {"vocab": "llama-bpe", "size": 128256, "bos": ("<|begin_of_text|>", 128000),
               "eos": ("<|end_of_text|>", 128001), "pad": ("<|reserved_special_token_0|>", 128002),
               "eot": ("<|eot_id|>", 128009)},
    "qwen2": {"vocab": "qwen2", "size": 151936, "bos": None, "eos": ("<|endoftext|>", 151643),
              "pad": ("<|endoftext|>", 151643), "eot": ("<|im_end|>", 151645)},
}
# inputs of the .inp files whose .out tokenization the converted vocabularies reproduce (see test_reference...)
REFERENCE_TEXTS = ("Hello world", "Hello, world!", "w048 7tuijk dsdfhu", "нещо на Български", "3333333",
                   "Hello, y'all! How are you 😁 ?我想在apple工作1314151天～", "\n =", "' era")


def extract_vocabularies(sdist: Path, vocab: Path, names: list[str]):
    """The named files of the sdist's vendor/llama.cpp/models into vocab, each renamed into place whole."""
    tmp = Path(tempfile.mkdtemp(dir=vocab, prefix=".extract-"))
    patterns = [f"*/vendor/llama.cpp/models/{name}" for name in names]
    subprocess.run(["tar", "xzf", str(sdist), "-C", str(tmp), "--strip-components=4", "--wildcards", *patterns],
                   check=True)
    for name in names:
        os.replace(tmp / name, vocab / name)
    shutil.rmtree(tmp)


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    downloads, vocab = cache_dir() / "downloads", cache_dir() / "vocab"
    names = [f"ggml-vocab-{v}.gguf{ext}" for v in VOCABS for ext in ("", ".inp", ".out")]
    if all((vocab / name).is_file() for name in names):
        return vocab
    downloads.mkdir(parents=True, exist_ok=True)
    with open(downloads / ".vocab.lock", "w") as lock:  # test files on two workers need it at once: one downloads
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all((vocab / name).is_file() for name in names):
            return vocab
        sdist = downloads / SDIST_FILE
        if not sdist.is_file():
            # only llama-cpp-python as source: --no-binary :all: would build its build backend's dependencies too
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
                       SDIST_SPEC, "-d", str(downloads)]
            result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=900)
            if result.returncode != 0 or not sdist.is_file():
                pytest.fail(f"`{' '.join(command)}` failed: the test vocabularies come from {SDIST_SPEC}'s source "
                            f"distribution and need the package registry.\n{result.stdout[-1000:]}"
                            f"{result.stderr[-2000:]}")
        vocab.mkdir(parents=True, exist_ok=True)
        extract_vocabularies(sdist, vocab, names)
    return vocab


def converted_vocabulary(vocab_dir: Path, name: str) -> Path:
    """ggml-vocab-<name>.gguf saved as a transformers tokenizer folder (once per transformers version)."""
    import transformers
    from transformers import AutoTokenizer

    folder = vocab_dir / f"hf-{name}-transformers-{transformers.__version__}"
    if not (folder / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(vocab_dir, gguf_file=f"ggml-vocab-{name}.gguf")
        tmp = Path(tempfile.mkdtemp(dir=vocab_dir, prefix=f".{folder.name}-"))
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process converted it first
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


@pytest.fixture(scope="session")
def vocab_folders(vocab_dir) -> dict[str, Path]:
    return {name: converted_vocabulary(vocab_dir, name) for name in VOCABS}


def family_tokenizer(folders: dict[str, Path], family: str):
    """A family's tokenizer as the recipes load it (common.model.load_tokenizer: ensure_pad_token, left padding),
    with what the gguf vocabulary lacks set as the real model has it."""
    tokenizer = load_tokenizer(folders[FAMILIES[family]["vocab"]])
    if family == "llama2":
        tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
    elif family == "mistral":
        tokenizer.chat_template = MISTRAL_TEMPLATE
    elif family == "llama3":
        tokenizer.add_bos_token = True  # the gguf load drops the BOS post-processor Meta's tokenizer.json has
        tokenizer.chat_template = LLAMA3_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def tokenizers(vocab_folders) -> dict:
    return {family: family_tokenizer(vocab_folders, family) for family in FAMILIES}


def alpaca(instruction="Name the capital of France.", extra="", output="The capital of France is Paris."):
    return Record({"instruction": instruction, "input": extra, "output": output}, "test.jsonl:1")


def trained_runs(example) -> list[list[int]]:
    """The token ids of each maximal run of trained labels."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs, current = [*runs, current], []
    return runs + [current] if current else runs


@pytest.mark.parametrize("name", VOCABS)
def test_converted_vocabulary_reproduces_llama_cpp_reference_tokenizations(vocab_dir, vocab_folders, name):
    """The gguf loaded right: the transformers tokenizer gives llama.cpp's reference ids."""
    from transformers import AutoTokenizer

    inputs = (vocab_dir / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = (vocab_dir / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    reference = {text: [int(i) for i in ids.split()] for text, ids in zip(inputs, outputs)}
    tokenizer = AutoTokenizer.from_pretrained(vocab_folders[name])
    for text in REFERENCE_TEXTS:
        assert tokenizer(text, add_special_tokens=False).input_ids == reference[text], text


@pytest.mark.parametrize("family", FAMILIES)
def test_special_tokens_and_pad_of_each_family(tokenizers, family):
    tokenizer, facts = tokenizers[family], FAMILIES[family]
    special = {"eos": (tokenizer.eos_token, tokenizer.eos_token_id),
               "pad": (tokenizer.pad_token, tokenizer.pad_token_id)}
    assert special == {"eos": facts["eos"], "pad": facts["pad"]}
    eot_ids = end_of_turn_ids(tokenizer)
    assert [tokenizer.convert_ids_to_tokens(i) for i in eot_ids] == [facts["eot"][0]] and eot_ids == [facts["eot"][1]]
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id < facts["size"]  # a row of the real model's embedding
    if facts["eot"] != facts["eos"]:
        assert tokenizer.pad_token_id != eot_ids[0]  # the end-of-turn id is trained: a pad must never be it
    ids = tokenizer("Hello world").input_ids
    if facts["bos"]:
        assert (tokenizer.bos_token, tokenizer.bos_token_id) == facts["bos"]
        assert ids[0] == facts["bos"][1] and ids.count(facts["bos"][1]) == 1
    else:
        assert ids == tokenizer("Hello world", add_special_tokens=False).input_ids  # nothing added


@pytest.mark.parametrize("family", FAMILIES)
def test_alpaca_example_trains_exactly_the_answer_and_eos_after_one_bos(tokenizers, family):
    tokenizer, facts = tokenizers[family], FAMILIES[family]
    record = alpaca()
    (example,), _ = build_sft_examples([record], tokenizer, max_seq_len=512)
    ids, labels = example["input_ids"], example["labels"]
    prompt_text, add_special = generation_prompt(record, tokenizer)
    prompt_ids = encode_prompt(tokenizer, prompt_text, add_special)
    assert ids[:len(prompt_ids)] == prompt_ids  # what inference feeds is what training conditioned on
    assert labels == [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids):]
    assert ids[-1] == facts["eos"][1]
    assert tokenizer.decode(ids[len(prompt_ids):-1]) == record.data["output"]
    if facts["bos"]:
        assert ids[0] == facts["bos"][1] and ids.count(facts["bos"][1]) == 1
    else:
        assert ids[0] != facts["eos"][1] and ids.count(facts["eos"][1]) == 1  # Qwen2: no BOS, one EOS at the end


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_example_trains_every_reply_and_its_end_of_turn_and_nothing_else(tokenizers, family):
    tokenizer, facts = tokenizers[family], FAMILIES[family]
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "And of Italy?"},
                {"role": "assistant", "content": "Rome is the capital of Italy."}]
    record = Record({"messages": messages}, "chat.jsonl:1")
    (example,), _ = build_sft_examples([record], tokenizer, max_seq_len=512)
    ids, labels = example["input_ids"], example["labels"]
    eot = facts["eot"][1]
    runs = trained_runs(example)
    assert [tokenizer.decode(run, skip_special_tokens=True).strip() for run in runs] == ["Paris.",
                                                                                          messages[3]["content"]]
    assert [run.count(eot) for run in runs] == [1, 1]  # each reply ends with the end-of-turn token, trained
    if facts["eot"] != facts["eos"]:  # every turn ends with it (and Qwen's default system turn); the users' untrained
        assert ids.count(eot) == len(messages) + (family == "qwen2")
    # the prompt of the last reply, as inference renders it, is a prefix of the conversation, all untrained
    prompt_text, add_special = generation_prompt(Record({"messages": messages[:3]}, "chat.jsonl:1"), tokenizer)
    prompt_ids = encode_prompt(tokenizer, prompt_text, add_special)
    assert ids[:len(prompt_ids)] == prompt_ids
    assert labels[len(prompt_ids) - 1] == IGNORE_INDEX and labels[len(prompt_ids)] != IGNORE_INDEX
    bos = facts["bos"][1] if facts["bos"] else None
    if family == "llama2":
        assert ids[0] == bos and ids.count(bos) == 2  # Llama-2-chat: a BOS before each [INST]
    elif bos is not None:
        assert ids[0] == bos and ids.count(bos) == 1
    else:
        assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_answer_truncation_keeps_bos_and_the_answer(tokenizers, family):
    tokenizer, facts = tokenizers[family], FAMILIES[family]
    record = alpaca(extra="Some context that is long. " * 40)
    (example,), stats = build_sft_examples([record], tokenizer, max_seq_len=48)
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == 48 and stats.truncated_examples == 1
    if facts["bos"]:
        assert ids[0] == facts["bos"][1] and labels[0] == IGNORE_INDEX
    trained = [t for t in labels if t != IGNORE_INDEX]
    assert trained[-1] == facts["eos"][1] and tokenizer.decode(trained[:-1]) == record.data["output"]
    assert labels[-len(trained):] == trained and IGNORE_INDEX not in labels[-len(trained):]


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_rows_carry_no_loss(tokenizers, family):
    tokenizer = tokenizers[family]
    examples, _ = build_sft_examples([alpaca(), alpaca(instruction="Hi", output="Hello.")], tokenizer, 512)
    batch = collate_left_padded(examples, tokenizer.pad_token_id)
    for row, example in enumerate(examples):
        n_pad = batch["input_ids"].shape[1] - len(example["input_ids"])
        assert batch["input_ids"][row, :n_pad].tolist() == [tokenizer.pad_token_id] * n_pad
        assert batch["attention_mask"][row, :n_pad].sum() == 0
        assert batch["labels"][row, :n_pad].tolist() == [IGNORE_INDEX] * n_pad
        assert batch["labels"][row, n_pad:].tolist() == example["labels"]  # the trained EOS keeps its label
    assert (batch["labels"] != IGNORE_INDEX).sum() == sum(sum(t != IGNORE_INDEX for t in e["labels"]) for e in examples)


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_stops_at_eos_and_the_end_of_turn(tokenizers, family):
    from transformers import GenerationConfig

    tokenizer, facts = tokenizers[family], FAMILIES[family]
    expected = list(dict.fromkeys([facts["eos"][1], facts["eot"][1]]))
    assert stop_token_ids(tokenizer) == expected
    base = SimpleNamespace(generation_config=GenerationConfig(eos_token_id=facts["eos"][1]))  # a base checkpoint's
    assert make_generation_config(base, tokenizer, 16).eos_token_id == expected
    no_template = copy.deepcopy(tokenizer)
    no_template.chat_template = None
    assert stop_token_ids(no_template) == [facts["eos"][1]]


def test_generation_with_end_of_turn_other_than_eos_stops_there(tiny_model, tokenizer):
    """The tiny model, made to answer A A A <end-of-turn> B B ... (prefix_allowed_tokens_fn): with
    make_generation_config it stops after the end-of-turn token; with the base's EOS alone it runs on."""
    tok = copy.deepcopy(tokenizer)  # <|user|> ends each turn, as Llama 3's <|eot_id|> (a special token, not EOS)
    tok.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|user|>' }}"
                         "{% endfor %}")
    eot = tok.convert_tokens_to_ids("<|user|>")
    a, b = (tok(text, add_special_tokens=False).input_ids[-1] for text in ("A", "B"))
    prompt = torch.tensor([tok("Hello").input_ids])

    def script(batch_id, sequence):
        step = len(sequence) - prompt.shape[1]
        if step == 3:
            return [eot]
        return [a] if step < 3 else [b]

    with_eot = make_generation_config(tiny_model, tok, max_new_tokens=8)
    base_only = copy.deepcopy(with_eot)
    base_only.eos_token_id = [tok.eos_token_id]
    with torch.no_grad():
        stopped = tiny_model.generate(prompt, generation_config=with_eot, prefix_allowed_tokens_fn=script)
        ran_on = tiny_model.generate(prompt, generation_config=base_only, prefix_allowed_tokens_fn=script)
    assert stopped[0, prompt.shape[1]:].tolist() == [a, a, a, eot]
    assert ran_on[0, prompt.shape[1]:].tolist() == [a, a, a, eot, b, b, b, b]


@pytest.mark.slow  # the sft recipe and merge_lora end to end
def test_sft_qlora_and_merge_lora_write_eos_and_end_of_turn_to_generation_config(tiny_dir, tmp_path):
    """A tiny checkpoint whose chat template ends turns with <|user|> (standing in for <|eot_id|>): sft/qlora's
    final/generation_config.json and the merged model's stop at EOS and at <|user|>."""
    base = tmp_path / "base"
    shutil.copytree(tiny_dir, base)
    (base / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|user|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
    tok = load_tokenizer(base)
    expected = [tok.eos_token_id, tok.convert_tokens_to_ids("<|user|>")]
    out = tmp_path / "out"
    result = run_script(REPO / "sft/qlora/run.sh", "--max_steps=1", "--report_to=none", f"--output_dir={out}",
                        f"--model_path={base}", "--eval_data_path=", "--prompt_template=chat", "--batch_size=2",
                        "--max_seq_len=64", timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert json.loads((out / "final" / "generation_config.json").read_text())["eos_token_id"] == expected
    merged = tmp_path / "merged"
    load_tool("merge_lora").main([f"--base={base}", f"--adapter={out / 'final'}", f"--out={merged}"])
    assert json.loads((merged / "generation_config.json").read_text())["eos_token_id"] == expected
