"""Pooling of a classifier's hidden states (left-padded rows) and the pooled classifier's padding independence."""
import pytest
import torch

from common.data import collate_left_padded
from common.model import PooledClassifier, pool_hidden


def test_pooling_on_left_padded_rows():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float).view(2, 4, 3)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert pool_hidden(hidden, mask, "last").tolist() == hidden[:, -1].tolist()
    torch.testing.assert_close(pool_hidden(hidden, mask, "mean")[0], hidden[0, 2:].mean(0))
    torch.testing.assert_close(pool_hidden(hidden, mask, "mean")[1], hidden[1].mean(0))
    with pytest.raises(ValueError):
        pool_hidden(hidden, mask, "max")


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_classifier_scores_do_not_depend_on_padding(tiny_dir, tokenizer, pooling):
    from transformers import AutoModelForSequenceClassification

    from common.model import load_model

    torch.manual_seed(0)
    model = load_model(tiny_dir, "none", model_class=AutoModelForSequenceClassification, num_labels=3).eval()
    clf = PooledClassifier(model, pooling)
    rows = [{"input_ids": tokenizer(t).input_ids} for t in ("short", "a much longer text than the other one")]
    with torch.no_grad():
        together = clf(**collate_left_padded(rows, tokenizer.pad_token_id))
        for i, row in enumerate(rows):
            alone = clf(**collate_left_padded([row], tokenizer.pad_token_id))
            torch.testing.assert_close(together[i], alone[0], atol=1e-5, rtol=0)
