"""The recipes' LM loss (common.losses.causal_lm_loss_sum, trained_token_loss_sum): the LM head on the trained tokens
only, whole or in chunks, gives the value and gradients of token_loss_sum over the model's own logits, through a
LoRA model whose lm_head trains too; autograd keeps logits only for the trained tokens (whole) or for none (chunked);
a batch with no trained token still backpropagates."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, LlamaForCausalLM

from common.data import build_sft_examples, collate_left_padded, read_records
from common.losses import causal_lm_loss_sum, loss_window, token_loss_sum, trained_token_loss_sum
from tests.conftest import REPO


@pytest.fixture(scope="module")
def batch_and_labels(tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    examples, _ = build_sft_examples(read_records(REPO / "data" / "sft" / "train.jsonl"), tokenizer, 1024)
    batch = collate_left_padded(examples[:4], tokenizer.pad_token_id)
    labels = batch.pop("labels")
    return batch, labels


def lora_model(tiny_dir):
    """The tiny model with LoRA on every projection (B not zero, so every LoRA matrix gets a gradient) and a
    trained copy of lm_head, as sft/qlora's --lora_modules_to_save=lm_head."""
    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules="all-linear", modules_to_save=["lm_head"], init_lora_weights=False)
    return get_peft_model(LlamaForCausalLM.from_pretrained(tiny_dir), config)


def recipe_loss(model, batch, labels, chunk_tokens):
    """chunk_tokens None: token_loss_sum over the model's logits of the answers' window (the reference)."""
    window = loss_window(labels)
    if chunk_tokens is None:
        return token_loss_sum(model(**batch, use_cache=False, logits_to_keep=window).logits, labels)
    return causal_lm_loss_sum(model, model.get_output_embeddings(), batch, labels, window, chunk_tokens)


def loss_and_gradients(model, batch, labels, chunk_tokens):
    model.zero_grad(set_to_none=True)
    loss = recipe_loss(model, batch, labels, chunk_tokens)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("chunk_tokens", [0, 1, 7, 100_000])
def test_head_on_trained_tokens_equals_the_plain_loss_and_its_gradients(tiny_dir, batch_and_labels, chunk_tokens):
    batch, labels = batch_and_labels
    model = lora_model(tiny_dir)
    plain_loss, plain_grads = loss_and_gradients(model, batch, labels, None)
    loss, grads = loss_and_gradients(model, batch, labels, chunk_tokens)
    assert loss.item() == pytest.approx(plain_loss.item(), rel=1e-6)
    assert grads.keys() == plain_grads.keys() and any("lm_head" in name for name in grads)
    for name, grad in plain_grads.items():  # the summed loss's gradients are O(1): atol as the logits_to_keep test
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-5, msg=f"{name} differs")


def largest_saved_logits(model, batch, labels, chunk_tokens) -> int:
    """Rows of the largest tensor with a vocabulary-sized last dimension that autograd keeps for backward, weights
    (the transposed head that the matmul keeps) left out."""
    vocab = model.config.vocab_size
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    rows = [0]

    def pack(tensor):
        if tensor.dim() >= 2 and tensor.shape[-1] == vocab and tensor.untyped_storage().data_ptr() not in weights:
            rows.append(tensor.numel() // vocab)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = recipe_loss(model, batch, labels, chunk_tokens)
    loss.backward()
    return max(rows)


def test_logits_kept_for_backward_only_at_trained_tokens_and_none_when_chunked(tiny_dir, batch_and_labels):
    batch, labels = batch_and_labels
    model = lora_model(tiny_dir)
    window = loss_window(labels)
    trained = int((labels[:, 1:] != -100).sum())
    assert 16 < trained < labels.shape[0] * window  # the rows' answers differ in length
    # the model's logits: every row's whole window (and their fp32 log-softmax)
    assert largest_saved_logits(model, batch, labels, None) >= labels.shape[0] * window
    # the head on the trained tokens: those tokens' logits (the model's one position per row aside)
    assert largest_saved_logits(model, batch, labels, 0) == trained
    # chunked: only the one position the model itself computes (logits_to_keep=1) per row; the chunks are recomputed
    assert largest_saved_logits(model, batch, labels, 16) <= labels.shape[0]


def test_no_trained_token_gives_zero_and_still_backpropagates(tiny_dir, batch_and_labels):
    batch, labels = batch_and_labels
    model = lora_model(tiny_dir)
    nothing = torch.full_like(labels, -100)
    loss, grads = loss_and_gradients(model, batch, nothing, 8)
    assert loss.item() == 0.0
    assert all(float(grad.abs().max()) == 0.0 for grad in grads.values() if grad is not None)
    with pytest.raises(ValueError, match="chunk_tokens must be 0"):
        trained_token_loss_sum(torch.zeros(1, 2, 4), model.get_output_embeddings(), nothing[:, :2], -1)
