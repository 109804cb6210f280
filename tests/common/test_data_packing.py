"""Packed documents under flash-attention 2 (pretrain --document_mask, sft --packing): the batch is joined into one
row, as transformers finds packed documents from restarting position ids only in a batch of one row. Checked on CPU
(no flash-attn here) through transformers' own detection helpers and through sdpa with the equivalent block mask."""
import numpy as np
import torch
from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

from common.data import IGNORE_INDEX, build_sft_examples, collate_packed, pack_examples, read_records
from common.losses import count_trained_tokens, token_loss_sum
from common.pretrain_data import encode_document, make_batch
from tests.conftest import REPO

TEXTS = ["Rain in Spain.", "今天天气很好。", "Add the two numbers. 93 and 77", "a b c d e f g", "你好，世界",
         "The quick brown fox jumps over the lazy dog.", "Reverse: x y z"]


def pretrain_windows(tokenizer, n_windows=3, seq_len=24):
    """Windows of a stream of documents, cut as the loader cuts them (stride seq_len - 1)."""
    stream = [t for _ in range(4) for text in TEXTS for t in encode_document(tokenizer, text)]
    return [np.asarray(stream[i * (seq_len - 1):i * (seq_len - 1) + seq_len], dtype=np.int64) for i in range(n_windows)]


def block_mask_from_positions(position_ids):
    """The (B, 1, L, L) causal mask keeping apart the runs of position ids that restart at 0: what flash-attention
    2's varlen kernel computes from cu_seq_lens."""
    doc = (position_ids == 0).long().cumsum(-1)
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return (causal & (doc[:, :, None] == doc[:, None, :])).unsqueeze(1)


def mean_loss(model, batch):
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       attention_mask=batch["attention_mask"]).logits
    return float(token_loss_sum(logits, batch["labels"])) / count_trained_tokens(batch["labels"])


def test_pretrain_fa2_batch_is_one_row_with_restarting_positions(tokenizer):
    windows = pretrain_windows(tokenizer)
    rows = make_batch(windows, tokenizer.eos_token_id, "sdpa")
    flat = make_batch(windows, tokenizer.eos_token_id, "positions")
    n, length = len(windows), len(windows[0])
    assert set(flat) == {"input_ids", "labels", "position_ids"}
    assert flat["input_ids"].shape == (1, n * length)
    assert torch.equal(flat["input_ids"][0], torch.from_numpy(np.concatenate(windows)))
    assert torch.equal(flat["position_ids"][0], rows["position_ids"].reshape(-1))
    expected_labels = rows["labels"].clone()
    expected_labels[:, 0] = IGNORE_INDEX  # no row's first token is predicted by the previous row's last one
    assert torch.equal(flat["labels"][0], expected_labels.reshape(-1))
    assert count_trained_tokens(flat["labels"]) == n * (length - 1) == count_trained_tokens(rows["labels"])


def test_transformers_finds_the_documents_of_the_joined_row_and_none_in_the_rows(tokenizer):
    """transformers' own packed-sequence detection: the joined row's restarting position ids give one cu_seq_lens
    boundary per document (and per row); a batch of several rows is not detected at all (the bug fixed here)."""
    windows = pretrain_windows(tokenizer)
    rows = make_batch(windows, tokenizer.eos_token_id, "sdpa")
    flat = make_batch(windows, tokenizer.eos_token_id, "positions")
    assert not _is_packed_sequence(rows["position_ids"], batch_size=len(windows))
    assert _is_packed_sequence(flat["position_ids"], batch_size=1)
    (cu_q, cu_k), (max_q, _) = prepare_fa_kwargs_from_position_ids(flat["position_ids"])
    starts = (flat["position_ids"][0] == 0).nonzero().view(-1).tolist()
    length = len(windows[0])
    assert cu_q.tolist() == starts + [len(windows) * length] and torch.equal(cu_q, cu_k)
    assert all(r * length in starts for r in range(len(windows)))  # every row starts a sequence of its own
    assert len(starts) > len(windows) and int(max_q) == int(rows["position_ids"].max()) + 1


def test_pretrain_joined_row_has_the_loss_of_the_masked_rows(tiny_model, tokenizer):
    windows = pretrain_windows(tokenizer)
    rows = make_batch(windows, tokenizer.eos_token_id, "sdpa")
    flat = make_batch(windows, tokenizer.eos_token_id, "positions")
    flat["attention_mask"] = block_mask_from_positions(flat["position_ids"])
    assert abs(mean_loss(tiny_model, flat) - mean_loss(tiny_model, rows)) < 1e-5


def test_sft_packed_fa2_batch_is_one_row_with_the_loss_of_the_masked_rows(tiny_model, tokenizer):
    examples, _ = build_sft_examples(read_records(REPO / "data" / "sft" / "train.jsonl"), tokenizer, 1024)
    rows = pack_examples(examples[:9], 160)
    masked = collate_packed(rows, tokenizer.pad_token_id, "sdpa")
    flat = collate_packed(rows, tokenizer.pad_token_id, "flash_attention_2")
    n, width = masked["input_ids"].shape
    assert n > 1 and set(flat) == {"input_ids", "labels", "position_ids"}
    assert torch.equal(flat["input_ids"], masked["input_ids"].reshape(1, -1))
    assert torch.equal(flat["position_ids"], masked["position_ids"].reshape(1, -1))
    assert (flat["labels"][0, ::width] == IGNORE_INDEX).all()
    assert count_trained_tokens(flat["labels"]) == count_trained_tokens(masked["labels"])
    assert _is_packed_sequence(flat["position_ids"], batch_size=1)
    flat["attention_mask"] = block_mask_from_positions(flat["position_ids"])
    assert abs(mean_loss(tiny_model, flat) - mean_loss(tiny_model, masked)) < 1e-5
