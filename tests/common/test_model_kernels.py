"""The two optional speed-ups of a model's step: Liger's kernels (--liger: only on a GPU with liger-kernel, so on
CPU 'auto' leaves the model untouched and 'on' is a one-line error) and torch.compile of the decoder layers
(--compile: the same loss and adapter gradients as eager, the same parameter names)."""
import pytest
import torch

from common.config import UserError
from common.data import build_sft_examples, collate_left_padded, read_records
from common.losses import causal_lm_loss_sum, loss_window
from common.model import add_lora, compile_decoder_layers, load_model, prepare_for_lora_training, resolve_liger
from tests.conftest import REPO


def test_liger_is_off_on_cpu_unless_insisted_on_which_is_a_user_error():
    cpu = torch.device("cpu")
    assert resolve_liger("auto", cpu) is False and resolve_liger("off", cpu) is False
    with pytest.raises(UserError, match=r"--liger=on needs (a GPU|liger-kernel)"):
        resolve_liger("on", cpu)
    with pytest.raises(UserError, match=r"--liger must be auto, on or off, got 'yes'"):
        resolve_liger("yes", cpu)


@pytest.mark.slow
def test_liger_on_on_cpu_stops_the_recipe_in_one_line_before_writing_anything(tmp_path):
    from tests.conftest import run_script

    out = tmp_path / "out"
    proc = run_script(REPO / "sft" / "qlora" / "run.sh", f"--output_dir={out}", "--liger=on")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --liger=on needs") and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stdout + proc.stderr and not out.exists()


def lora_model(tiny_dir):
    torch.manual_seed(0)
    base = prepare_for_lora_training(load_model(tiny_dir, "none"), False, False)
    return add_lora(base, 8, 16, 0.0, ["all-linear"]).train()


@pytest.mark.slow
def test_compiled_layers_give_the_eager_loss_and_gradients(tiny_dir, tokenizer):
    examples, _ = build_sft_examples(read_records(REPO / "data" / "sft" / "train.jsonl"), tokenizer, 256)
    eager, compiled = lora_model(tiny_dir), lora_model(tiny_dir)
    names = [name for name, _ in compiled.named_parameters()]
    assert compile_decoder_layers(compiled) == compiled.config.num_hidden_layers
    assert [name for name, _ in compiled.named_parameters()] == names  # adapters save under the same keys
    for rows in (examples[:4], examples[4:7]):  # two batch shapes: the second may recompile
        batch = collate_left_padded(rows, tokenizer.pad_token_id)
        labels = batch.pop("labels")
        losses, grads = [], []
        for model in (eager, compiled):
            loss = causal_lm_loss_sum(model, model.get_output_embeddings(), batch, labels, loss_window(labels))
            loss.backward()
            losses.append(loss.detach())
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
            model.zero_grad(set_to_none=True)
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
        assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
        for name in grads[0]:
            torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)
