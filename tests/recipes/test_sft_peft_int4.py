"""sft/peft-int4 end to end on CPU: the tiny Llama quantized to GPTQ int4 by gptqmodel, LoRA trained on top, and
data_scripts/quantize_gptq.py."""
import json
import math
import os
import shutil

import pytest
import torch

from tests.conftest import REPO, load_recipe, read_metrics, run_script

RECIPE = REPO / "sft" / "peft-int4"
QUANTIZE = REPO / "data_scripts" / "quantize_gptq.py"
sft_peft_int4 = load_recipe(RECIPE)

FAST = ["--report_to=none", "--batch_size=8", "--grad_accum=1", "--lr=1e-3", "--log_every=1"]



def run_main(out, *args):
    return sft_peft_int4.main(sft_peft_int4.parse_config(sft_peft_int4.Config, [f"--output_dir={out}", *FAST, *args]))


def sample_batch(tokenizer):
    from common.data import collate_left_padded

    texts = ("Reverse: a b c", "你好，世界", "Add the two numbers. 93 and 77")
    return collate_left_padded([{"input_ids": tokenizer(t).input_ids} for t in texts], tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def gptq_dir():
    from common.gptq import materialize_tiny_gptq

    return materialize_tiny_gptq()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, gptq_dir):
    """One short in-process run (eval before, during and after training) shared by the tests that inspect it."""
    return run_main(tmp_path_factory.mktemp("trained") / "out", "--max_steps=4", "--eval_every=2")


@pytest.mark.slow
def test_run_sh_trains_and_writes_artifacts(tmp_path, gptq_dir):
    out = tmp_path / "out"
    proc = run_script(RECIPE / "run.sh", f"--output_dir={out}", "--max_steps=12", "--batch_size=8", "--grad_accum=1",
                      "--lr=1e-3", "--eval_every=6")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    evals = [r["eval_loss"] for r in read_metrics(out) if "eval_loss" in r]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses  # loss falls
    assert len(evals) == 3 and evals[-1] < evals[0]
    assert all(k in r for r in read_metrics(out) if "loss" in r for k in ("step", "loss", "lr", "tokens_per_s"))
    assert "GPTQ int4 group 128 base, kernel TorchAtenLinear" in proc.stdout
    assert "step 12/12 | loss" in proc.stdout and "tok/s | mem" in proc.stdout
    final = out / "final"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (final / name).is_file(), name
    targets = set(json.loads((final / "adapter_config.json").read_text())["target_modules"])
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert json.loads((out / "config.json").read_text())["max_steps"] == 12
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_only_adapters_train_and_int4_weights_stay(trained, gptq_dir):
    from common.gptq import load_gptq_model

    model = trained["model"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable), trainable
    fresh = {n: b for n, b in load_gptq_model(gptq_dir).named_buffers() if n.rsplit(".", 1)[-1] in ("qweight", "qzeros",
                                                                                                    "scales")}
    after = {n.replace("base_model.model.", "", 1).replace(".base_layer", ""): b for n, b in model.named_buffers()
             if n.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales")}
    assert len(fresh) == 3 * 28 and after.keys() == fresh.keys()  # 4 layers x 7 projections
    assert all(after[n].dtype == torch.int32 for n in after if n.endswith("qweight"))
    assert all(torch.equal(after[n], fresh[n]) for n in fresh)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # yet the adapter trained


@pytest.mark.slow
def test_saved_adapter_reloads_and_reproduces_logits(trained, gptq_dir):
    from peft import PeftModel

    from common.gptq import load_gptq_model

    batch = sample_batch(trained["tokenizer"])
    with torch.no_grad():
        in_memory = trained["model"].eval()(**batch).logits
        reloaded = PeftModel.from_pretrained(load_gptq_model(gptq_dir), trained["final_dir"]).eval()
        from_disk = reloaded(**batch).logits
    torch.testing.assert_close(from_disk, in_memory, atol=1e-5, rtol=0)


def test_lora_gradients_stay_exact_after_an_eval_forward(gptq_dir, tokenizer):
    """gptqmodel's CPU kernel repacks its weights for an inference-only matmul (no input gradient) at the first no-grad
    eval forward; load_gptq_model must keep it differentiable, so LoRA gradients still match a model with the same
    weights dequantized into ordinary Linear layers."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from transformers import AutoModelForCausalLM

    from common.gptq import gptq_linear_names, load_gptq_model
    from common.model import add_lora, materialize_tiny_llama

    quantized = load_gptq_model(gptq_dir)
    dequantized = AutoModelForCausalLM.from_pretrained(materialize_tiny_llama(), dtype=torch.float32)
    with torch.no_grad():
        for name, layer in quantized.named_modules():
            if isinstance(layer, BaseQuantLinear):
                dequantized.get_submodule(name).weight.copy_(layer.dequantize_weight().float().T)
    batch = sample_batch(tokenizer)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    targets, grads = gptq_linear_names(quantized), []
    for model in (quantized, dequantized):
        model.requires_grad_(False)
        model = add_lora(model, 8, 16, 0.0, targets)
        torch.manual_seed(0)
        with torch.no_grad():
            for _name, p in sorted(model.named_parameters()):
                if p.requires_grad:
                    p.normal_(std=0.05)  # lora_B nonzero too, so gradients flow through every adapter
            model.eval()(**batch)  # what the recipe's eval before training does
        model.train()(**batch, labels=labels).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 28
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path, gptq_dir):
    args = ["--max_steps=6", "--save_every=3", "--lora_dropout=0.1", "--eval_data_path="]
    straight = run_main(tmp_path / "a", *args)
    run_main(tmp_path / "b", *args)
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_00000006")  # keep only step 3 of run b, then resume it
    resumed = run_main(tmp_path / "b", *args, "--resume")
    assert resumed["steps"] == 3
    assert resumed["losses"] == pytest.approx(straight["losses"][3:], abs=1e-6)


@pytest.mark.slow
def test_quantize_script_help_and_tiny_roundtrip(tmp_path, tiny_dir, tiny_model, tokenizer):
    from transformers import AutoModelForCausalLM

    proc = run_script(QUANTIZE, "--help")
    assert proc.returncode == 0 and "--group_size" in proc.stdout and "--calibration_data" in proc.stdout
    out = tmp_path / "tiny-gptq"
    proc = run_script(QUANTIZE, "--model_path=tiny", f"--out_dir={out}", "--n_samples=16", "--seq_len=64")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "quantized tiny" in proc.stdout and "16 calibration windows (1,024 tokens)" in proc.stdout
    assert not list(tmp_path.glob(".tiny-gptq.tmp-*"))  # built beside out_dir and renamed into place
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (quant["quant_method"], quant["bits"], quant["group_size"], quant["format"]) == ("gptq", 4, 128, "gptq")
    assert quant.get("dataset") is None  # calibration tokens are not written into the config
    assert (out / "tokenizer.json").is_file()

    from common.gptq import import_gptqmodel

    import_gptqmodel()
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reloaded.model.layers[0].mlp.down_proj).__name__ != "Linear"  # the int4 layers came back
    batch = sample_batch(tokenizer)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        full = tiny_model(**batch, labels=labels).loss.item()
        int4 = reloaded(**batch, labels=labels).loss.item()
    assert abs(int4 - full) < 0.05, (int4, full)  # measured: 7.676 vs 7.681


@pytest.mark.slow
def test_quantize_errors_are_one_clear_line(tmp_path, tiny_dir):
    from common.config import UserError
    from common.gptq import quantize_gptq

    with pytest.raises(UserError, match=r"--group_size=96: the input size of q_proj/k_proj/v_proj is 256, not a "
                                        r"multiple of 96; .* use --group_size=128"):
        quantize_gptq(tiny_dir, tmp_path / "q", group_size=96, calibration_texts=["some text"])
    with pytest.raises(UserError, match="no calibration text"):
        quantize_gptq(tiny_dir, tmp_path / "q", calibration_texts=["", "  "])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    proc = run_script(QUANTIZE, "--model_path=tiny", f"--out_dir={tmp_path / 'q'}", f"--calibration_data={empty}")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == f"error: {empty}: no records (empty file)"
    assert not (tmp_path / "q").exists()


@pytest.mark.slow
def test_model_without_gptq_config_is_a_clear_error(tmp_path, tiny_dir):
    proc = run_script(RECIPE / "run.sh", f"--model_path={tiny_dir}", f"--output_dir={tmp_path / 'o'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: --model_path={tiny_dir}: not a GPTQ checkpoint"), line
    assert f"python {QUANTIZE} --model_path={tiny_dir} --out_dir={tiny_dir}-gptq-int4" in line
    proc = run_script(RECIPE / "run.sh", f"--model_path={tmp_path / 'nope'}", f"--output_dir={tmp_path / 'o'}")
    assert proc.returncode == 2 and "no such folder" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(os.cpu_count() < 2, reason="two processes need two cores")
def test_two_process_data_parallel(tmp_path, gptq_dir):
    """An eval file of one record leaves one rank with nothing to evaluate: it must not hang the other."""
    out, one = tmp_path / "out", tmp_path / "one.jsonl"
    one.write_text((REPO / "data" / "sft" / "eval.jsonl").read_text(encoding="utf-8").splitlines()[0] + "\n")
    proc = run_script(RECIPE / "run.sh", f"--output_dir={out}", "--max_steps=3", "--report_to=none",
                      f"--eval_data_path={one}", env_extra={"NGPU": "2", "MASTER_PORT": "29641"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "torchrun, 2 processes" in proc.stdout
    assert (out / "final" / "adapter_model.safetensors").is_file()
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    evals = [r["eval_loss"] for r in read_metrics(out) if "eval_loss" in r]
    assert len(evals) == 2 and all(math.isfinite(x) for x in evals), evals
