"""Classification examples, label sets and preference pairs built from records."""
import pytest
import torch

from common.data import Record, build_cls_examples, build_preference_examples, collate_left_padded, label_set
from common.model import pool_hidden


def test_cls_examples_and_labels(tokenizer):
    recs = [Record({"text": "good", "label": "pos"}, "f:1"), Record({"text": "bad", "label": "neg"}, "f:2")]
    labels = label_set(recs, "label")
    assert labels == ["neg", "pos"]
    examples, _ = build_cls_examples(recs, tokenizer, 64, "classification", labels)
    assert [e["label"] for e in examples] == [1, 0]
    first_ids = examples[0]["input_ids"]
    assert first_ids[0] == tokenizer.bos_token_id and first_ids[-1] == tokenizer.eos_token_id
    long = [Record({"text": "word " * 50, "label": "pos"}, "f:1")]
    (ex,), stats = build_cls_examples(long, tokenizer, 10, "classification", labels)
    assert len(ex["input_ids"]) == 10 and ex["input_ids"][-1] == tokenizer.eos_token_id
    assert stats.truncated_examples == 1
    from common.data import DataError

    with pytest.raises(DataError, match="^f: field 'label' has 1 distinct value"):
        label_set(recs[:1], "label")
    with pytest.raises(DataError, match="mixes string and integer labels"):
        label_set(recs + [Record({"text": "x", "label": 3}, "f:3")], "label")


def test_preference_pairs_end_with_eos_even_when_pad_is_eos(tokenizer):
    """The known reward-model failure: with pad == EOS, pooling at 'the first pad' scores chosen and rejected alike.
    Left padding plus pooling at the last column reads each response's own final EOS."""
    recs = [Record({"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "I don't know."}, "p:1")]
    (pair,), _ = build_preference_examples(recs, tokenizer, 128)
    assert pair["chosen_ids"][-1] == pair["rejected_ids"][-1] == tokenizer.eos_token_id
    assert pair["chosen_ids"] != pair["rejected_ids"]
    batch = collate_left_padded([{"input_ids": pair["chosen_ids"]}, {"input_ids": pair["rejected_ids"]}],
                                pad_id=tokenizer.eos_token_id)  # pad == EOS on purpose
    hidden = torch.randn(2, batch["input_ids"].shape[1], 4)
    pooled = pool_hidden(hidden, batch["attention_mask"], "last")
    assert not torch.equal(pooled[0], pooled[1])
    from common.data import DataError

    with pytest.raises(DataError, match="p:2: fields 'chosen' and 'rejected' are identical"):
        build_preference_examples([Record({"prompt": "q", "chosen": "a", "rejected": "a"}, "p:2")], tokenizer, 64)
