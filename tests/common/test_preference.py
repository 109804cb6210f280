"""common.preference: a pair's answers scored in one left-padded forward equal each answer scored alone, unpadded;
answer token counts; the whole-set scoring fills every pair in its own row."""
import contextlib

import torch

from common.data import Record, build_preference_pairs
from common.losses import token_loss_sum
from common.preference import all_pair_logps, answer_tokens, pair_logps
from common.runtime import Runtime

RECORDS = [Record({"prompt": "Reverse the letters.", "chosen": "c b a", "rejected": "c b q"}, "x:1"),
           Record({"instruction": "Reverse the letters.", "input": "a b c d e f g", "chosen": "g f e d c b a",
                   "rejected": "a"}, "x:2"),
           Record({"prompt": "Say hi", "chosen": "hi", "rejected": "no thanks, not today"}, "x:3")]


def alone(model, ids, labels) -> float:
    """Log-likelihood of one answer, its row alone and unpadded: minus the summed cross-entropy."""
    logits = model(input_ids=torch.tensor([ids])).logits
    return -float(token_loss_sum(logits, torch.tensor([labels])))


def test_pair_logps_of_a_padded_batch_equal_each_answer_alone(tiny_model, tokenizer):
    pairs, _ = build_preference_pairs(RECORDS, tokenizer, 256)
    with torch.no_grad():
        chosen, rejected = pair_logps(tiny_model, pairs, [0, 1, 2], tokenizer.pad_token_id, torch.device("cpu"))
        for i, pair in enumerate(pairs):
            assert abs(float(chosen[i]) - alone(tiny_model, pair["chosen_ids"], pair["chosen_labels"])) < 1e-3
            assert abs(float(rejected[i]) - alone(tiny_model, pair["rejected_ids"], pair["rejected_labels"])) < 1e-3


def test_answer_tokens_count_the_trained_tokens_of_each_side(tokenizer):
    pairs, _ = build_preference_pairs(RECORDS[:1], tokenizer, 256)
    expected = [len(tokenizer("c b a", add_special_tokens=False).input_ids) + 1,  # + EOS
                len(tokenizer("c b q", add_special_tokens=False).input_ids) + 1]
    assert answer_tokens(pairs).tolist() == [expected]


def test_all_pair_logps_puts_every_pair_in_its_own_row(tiny_model, tokenizer):
    pairs, _ = build_preference_pairs(RECORDS, tokenizer, 256)
    rt = Runtime(torch.device("cpu"))
    logps = all_pair_logps(tiny_model, pairs, 2, tokenizer.pad_token_id, rt, contextlib.nullcontext())
    assert logps.shape == (3, 2) and logps.dtype == torch.float64
    with torch.no_grad():
        for i in range(3):
            chosen, rejected = pair_logps(tiny_model, pairs, [i], tokenizer.pad_token_id, torch.device("cpu"))
            assert torch.allclose(logps[i], torch.stack([chosen[0], rejected[0]]).double(), atol=1e-4)
    assert not tiny_model.training  # left in the mode it came in
