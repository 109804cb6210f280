"""Left padding must not change what the model computes for a row: logits and greedy generations of a padded batch
equal those of each row alone."""
import pytest
import torch

from common.data import collate_left_padded

PROMPTS = ["What is the capital of France?", "计算 17 加 25。", "Reverse the letters: a b c d e f g h i j"]


def encode(tokenizer):
    return [{"input_ids": tokenizer(p).input_ids} for p in PROMPTS]


def test_left_padded_batch_pads_on_the_left(tokenizer):
    rows = encode(tokenizer)
    batch = collate_left_padded(rows, tokenizer.pad_token_id)
    width = batch["input_ids"].shape[1]
    for r, row in enumerate(rows):
        n_pad = width - len(row["input_ids"])
        assert batch["input_ids"][r, :n_pad].eq(tokenizer.pad_token_id).all()
        assert batch["attention_mask"][r, :n_pad].eq(0).all() and batch["attention_mask"][r, n_pad:].eq(1).all()
        assert batch["input_ids"][r, n_pad:].tolist() == row["input_ids"]
    assert len({len(r["input_ids"]) for r in rows}) == len(rows)  # the test needs real padding


def test_last_token_logits_match_unpadded(tiny_model, tokenizer):
    rows = encode(tokenizer)
    batch = collate_left_padded(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        padded_last = tiny_model(**batch).logits[:, -1]
        for r, row in enumerate(rows):
            alone = collate_left_padded([row], tokenizer.pad_token_id)
            alone_last = tiny_model(**alone).logits[0, -1]
            torch.testing.assert_close(padded_last[r], alone_last, atol=1e-5, rtol=0)


def test_greedy_generation_of_padded_batch_equals_each_prompt_alone(tiny_model, tokenizer):
    rows = encode(tokenizer)
    batch = collate_left_padded(rows, tokenizer.pad_token_id)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    with torch.no_grad():
        together = tiny_model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
        width = batch["input_ids"].shape[1]
        for r, row in enumerate(rows):
            ids = torch.tensor([row["input_ids"]])
            alone = tiny_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            assert together[r, width:].tolist() == alone[0, ids.shape[1]:].tolist()


def test_packed_rows_compute_each_example_as_if_alone(tiny_model, tokenizer):
    """pack_examples + collate_packed: several examples in one row, position ids restarting and a block-diagonal
    mask, give every example the logits it has alone; labels and trained-token counts are unchanged."""
    from common.data import build_sft_examples, collate_packed, pack_examples, read_records
    from common.losses import count_trained_tokens
    from tests.conftest import REPO

    examples, _ = build_sft_examples(read_records(REPO / "data" / "sft" / "train.jsonl"), tokenizer, 1024)
    examples = examples[:7]
    rows = pack_examples(examples, 200)
    assert sorted(n for r in rows for n in r["segments"]) == sorted(len(e["input_ids"]) for e in examples)
    assert all(sum(r["segments"]) <= 200 for r in rows) and len(rows) < len(examples)
    batch = collate_packed(rows, tokenizer.pad_token_id)
    assert count_trained_tokens(batch["labels"]) == sum(count_trained_tokens(torch.tensor([e["labels"]])) for e in examples)
    with torch.no_grad():
        packed = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            position_ids=batch["position_ids"]).logits
    width = batch["input_ids"].shape[1]
    for r, row in enumerate(rows):
        start = width - sum(row["segments"])
        for n in row["segments"]:
            ids = batch["input_ids"][r, start:start + n]
            with torch.no_grad():
                alone = tiny_model(input_ids=ids[None]).logits[0]
            torch.testing.assert_close(packed[r, start:start + n], alone, atol=1e-4, rtol=0)
            assert batch["position_ids"][r, start:start + n].tolist() == list(range(n))
            start += n


def test_logits_only_over_the_answers_give_the_same_loss_and_gradients(tiny_dir, tokenizer):
    """loss_window + logits_to_keep: the LM head runs only where a trained token is predicted; the loss and every
    gradient equal those of the full logits."""
    from transformers import AutoModelForCausalLM

    from common.data import build_sft_examples, read_records
    from common.losses import loss_window, token_loss_sum
    from tests.conftest import REPO

    examples, _ = build_sft_examples(read_records(REPO / "data" / "sft" / "train.jsonl"), tokenizer, 1024)
    batch = collate_left_padded(examples[:4], tokenizer.pad_token_id)
    labels = batch.pop("labels")
    window = loss_window(labels)
    assert 1 < window < labels.shape[1]  # the prompts are left out
    results = []
    for keep in (0, window):  # 0: every position's logits
        model = AutoModelForCausalLM.from_pretrained(tiny_dir)
        logits = model(**batch, use_cache=False, logits_to_keep=keep).logits
        assert logits.shape[1] == (keep or labels.shape[1])
        loss = token_loss_sum(logits, labels)
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-6, rtol=1e-5, msg=name)
