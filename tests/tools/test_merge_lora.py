"""tools/merge_lora.py: merged weights give the logits of base + adapter, for causal LM and classifier adapters
trained on an NF4 base; quantized bases and unsafe output folders are refused."""
import json
import shutil

import pytest
import torch

from tests.tools.conftest import load_tool

merge_lora = load_tool("merge_lora")
TEXTS = ("Reverse: a b c d e f", "你好，世界", "The capital of France is")


def left_padded_batch(tokenizer, append_eos=False):
    from common.data import collate_left_padded

    rows = [tokenizer(t).input_ids + ([tokenizer.eos_token_id] if append_eos else []) for t in TEXTS]
    return collate_left_padded([{"input_ids": r} for r in rows], tokenizer.pad_token_id)


def test_merged_causal_lm_gives_the_logits_of_base_plus_adapter(sft_adapter, merged_sft, tiny_dir, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from common.model import load_model

    batch = left_padded_batch(tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(merged_sft, dtype=torch.float32).eval()
    base = load_model(tiny_dir).eval()
    with torch.no_grad():
        plain = base(**batch).logits
        with_adapter = PeftModel.from_pretrained(base, str(sft_adapter)).eval()(**batch).logits
        from_merged = merged(**batch).logits
    torch.testing.assert_close(from_merged, with_adapter, atol=1e-5, rtol=0)
    assert (with_adapter - plain).abs().max() > 1e-2  # the adapter matters, so the equality means something
    assert (merged_sft / "model.safetensors").is_file() and not (merged_sft / "adapter_config.json").exists()
    assert json.loads((merged_sft / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (merged_sft / "tokenizer.json").read_bytes() == (sft_adapter / "tokenizer.json").read_bytes()
    assert not list(merged_sft.parent.glob(".*tmp*"))  # the temporary folder was renamed, not left behind


def test_merged_classifier_gives_the_scores_of_base_plus_adapter(cls_adapter, merged_cls, tiny_dir, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from common.model import PooledClassifier, load_model

    labels = json.loads((cls_adapter / "labels.json").read_text())
    assert json.loads((merged_cls / "labels.json").read_text()) == labels
    config = json.loads((merged_cls / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert list(config["id2label"].values()) == labels["labels"]
    batch = left_padded_batch(tokenizer, append_eos=True)
    merged = AutoModelForSequenceClassification.from_pretrained(merged_cls, dtype=torch.float32).eval()
    base = load_model(tiny_dir, model_class=AutoModelForSequenceClassification, num_labels=3).eval()
    with torch.no_grad():
        with_adapter = PooledClassifier(PeftModel.from_pretrained(base, str(cls_adapter)).eval(), "last")(**batch)
        from_merged = PooledClassifier(merged, "last")(**batch)
    torch.testing.assert_close(from_merged, with_adapter, atol=1e-5, rtol=0)
    assert with_adapter.shape == (3, 3) and with_adapter.abs().max() > 1e-3


def fake_quantized_checkpoint(tiny_dir, folder, quant_method):
    """A folder whose config.json says it is stored quantized (only the config is read before refusing)."""
    folder.mkdir()
    config = json.loads((tiny_dir / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": quant_method,
                                                                                     "bits": 4}}))
    return folder


@pytest.mark.parametrize("method", ["gptq", "bitsandbytes"])
def test_a_quantized_base_is_refused_with_one_line(method, sft_adapter, tiny_dir, tmp_path, capsys):
    base = fake_quantized_checkpoint(tiny_dir, tmp_path / method, method)
    with pytest.raises(SystemExit) as exit_info:
        merge_lora.main([f"--base={base}", f"--adapter={sft_adapter}", f"--out={tmp_path / 'merged'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert err[0].startswith(f"error: --base={base}: a {method}-quantized checkpoint") and "full-precision" in err[0]
    assert not (tmp_path / "merged").exists()


def test_adapter_trained_on_gptq_merges_onto_full_precision_base_and_says_so(sft_adapter, tiny_dir, tmp_path,
                                                                             capsys):
    # an sft/peft-int4 adapter names the GPTQ folder as its base; only that folder's config.json is read
    gptq = fake_quantized_checkpoint(tiny_dir, tmp_path / "tiny-gptq", "gptq")
    adapter = shutil.copytree(sft_adapter, tmp_path / "run" / "final")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(gptq)}))
    merge_lora.main(["--base=tiny", f"--adapter={adapter}", f"--out={tmp_path / 'merged'}"])
    out = capsys.readouterr().out
    assert f"the adapter was trained on the GPTQ int4 checkpoint {gptq}; merged onto the full-precision --base" in out
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    # a QLoRA run: the note comes from the run's config.json beside final/
    assert "NF4 4-bit (bitsandbytes) quantization" in merge_lora.trained_base_note(sft_adapter, str(tiny_dir))


def test_out_must_be_a_new_folder_or_an_earlier_model(sft_adapter, tmp_path, capsys):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "keep.txt").write_text("not a model")
    with pytest.raises(SystemExit):
        merge_lora.main(["--base=tiny", f"--adapter={sft_adapter}", f"--out={precious}"])
    assert "exists and is not a model folder" in capsys.readouterr().err
    assert (precious / "keep.txt").is_file()
    with pytest.raises(SystemExit):  # a run folder instead of its final/
        merge_lora.main(["--base=tiny", f"--adapter={sft_adapter.parent}", f"--out={tmp_path / 'm'}"])
    assert f"the adapter is in --adapter={sft_adapter}" in capsys.readouterr().err
