"""data_scripts/convert_gguf.py on SmolLM2-135M-Instruct Q4_1: the converted folder gives the GGUF-loaded model's
logits, keeps the chat template and stops generation at its end-of-turn token, and answers a simple question; a
missing file, a file that is not GGUF and a non-Llama architecture are one-line errors."""
import importlib.util
import json

import pytest
import torch

from tests.conftest import REPO
from tests.real_model.conftest import write_jsonl
from tests.tools.conftest import load_tool

pytestmark = pytest.mark.slow  # the real checkpoint: converted, loaded and run on CPU

TEXTS = ("The capital of France is", "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n")


def load_convert_gguf():
    spec = importlib.util.spec_from_file_location("data_script_convert_gguf", REPO / "data_scripts" / "convert_gguf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


convert_gguf = load_convert_gguf()


def test_converted_model_gives_the_logits_of_the_gguf_model(smollm2_gguf, smollm2_dir):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    batch = tokenizer(list(TEXTS), return_tensors="pt", padding=True)
    converted = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    from_gguf = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                     dtype=torch.float32).eval()
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        expected, got = from_gguf(**batch).logits[real], converted(**batch).logits[real]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert converted.lm_head.weight.data_ptr() == converted.model.embed_tokens.weight.data_ptr()  # still tied

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    template = GGUFReader(smollm2_gguf).fields["tokenizer.chat_template"].contents()
    assert tokenizer.chat_template == template
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    eos_ids = eos if isinstance(eos, list) else [eos]
    assert end_of_turn in eos_ids, eos  # SmolLM2: eos is <|im_end|> itself
    assert not list(smollm2_dir.parent.glob(f".{smollm2_dir.name}.tmp-*"))  # renamed into place, nothing left over


def test_converted_model_answers_a_simple_question(smollm2_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"instruction": "What is the capital of France?"}])
    answers = tmp_path / "answers.jsonl"
    load_tool("generate").main([f"--model={smollm2_dir}", f"--prompts={prompts}", f"--out={answers}",
                                "--prompt_template=chat", "--max_new_tokens=32"])
    answer = json.loads(answers.read_text())["output"]
    assert "Paris" in answer and len(answer) < 80, answer  # and it stopped at <|im_end|>, not at 32 tokens


def one_line_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        convert_gguf.main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    return err[0]


def test_missing_file_text_file_and_other_architecture_are_one_line_errors(tmp_path, capsys):
    import gguf

    out = f"--out={tmp_path / 'out'}"
    missing = tmp_path / "none.gguf"
    assert one_line_error(capsys, f"--gguf={missing}", out) == \
        f"error: --gguf={missing}: no such file; expected a .gguf model file (llama.cpp / Ollama)"
    text = tmp_path / "notes.gguf"
    text.write_text("not a model\n")
    assert one_line_error(capsys, f"--gguf={text}", out) == \
        f"error: {text}: not a GGUF file (starts with b'not ', expected b'GGUF')"
    other = tmp_path / "qwen.gguf"
    writer = gguf.GGUFWriter(str(other), "qwen2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    line = one_line_error(capsys, f"--gguf={other}", out)
    assert line.startswith(f"error: {other}: the GGUF architecture is 'qwen2';") and "Llama" in line
    assert not (tmp_path / "out").exists()
