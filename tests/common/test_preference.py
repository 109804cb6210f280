"""common.preference: a pair's answers scored in one forward, left-padded or packed several to a row, equal each
answer scored alone and unpadded; answer token counts and the tokens a batch computes; the whole-set scoring fills
every pair in its own row. common.losses.sequence_logps: per-sequence sums, chunked or not, in value and gradient."""
import contextlib
from types import SimpleNamespace

import pytest
import torch

from common.data import Record, build_preference_pairs
from common.losses import sequence_logps, token_loss_sum
from common.preference import all_pair_logps, answer_tokens, pair_logps, pair_tokens_computed, tightest_pack_len
from common.runtime import Runtime

RECORDS = [Record({"prompt": "Reverse the letters.", "chosen": "c b a", "rejected": "c b q"}, "x:1"),
           Record({"instruction": "Reverse the letters.", "input": "a b c d e f g", "chosen": "g f e d c b a",
                   "rejected": "a"}, "x:2"),
           Record({"prompt": "Say hi", "chosen": "hi", "rejected": "no thanks, not today"}, "x:3")]
CPU = torch.device("cpu")


def alone(model, ids, labels) -> float:
    """Log-likelihood of one answer, its row alone and unpadded: minus the summed cross-entropy."""
    logits = model(input_ids=torch.tensor([ids])).logits
    return -float(token_loss_sum(logits, torch.tensor([labels])))


@pytest.mark.parametrize("pack_len", [0, 64, 256])
def test_pair_logps_padded_or_packed_equal_each_answer_alone(tiny_model, tokenizer, pack_len):
    pairs, _ = build_preference_pairs(RECORDS, tokenizer, 256)
    head = tiny_model.get_output_embeddings()
    with torch.no_grad():
        chosen, rejected = pair_logps(tiny_model, head, pairs, [0, 1, 2], tokenizer.pad_token_id, CPU, pack_len)
        for i, pair in enumerate(pairs):
            assert float(chosen[i]) == pytest.approx(alone(tiny_model, pair["chosen_ids"], pair["chosen_labels"]),
                                                     abs=1e-3)
            assert float(rejected[i]) == pytest.approx(alone(tiny_model, pair["rejected_ids"],
                                                             pair["rejected_labels"]), abs=1e-3)


class NoAttention(torch.nn.Module):
    """A stand-in model whose final hidden state at a position depends on its token alone: with no attention at all,
    any layout of the answers (rows, packed rows, or packed rows joined into one for flash-attention 2) gives the
    same log-likelihoods exactly when the bookkeeping of labels and owners is right."""

    def __init__(self, vocab):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 8)
        self.head = torch.nn.Linear(8, vocab, bias=False)

    def forward(self, input_ids, position_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(hidden_states=[torch.tanh(self.embed(input_ids))])


def test_packed_rows_joined_for_flash_attention_keep_each_answer_its_own_tokens(tokenizer):
    pairs, _ = build_preference_pairs(RECORDS, tokenizer, 256)
    torch.manual_seed(0)
    model = NoAttention(len(tokenizer))
    pad = tokenizer.pad_token_id
    padded = torch.cat(pair_logps(model, model.head, pairs, [0, 1, 2], pad, CPU))
    for pack_len, attention in [(64, "sdpa"), (64, "flash_attention_2"), (20, "flash_attention_2")]:
        packed = torch.cat(pair_logps(model, model.head, pairs, [0, 1, 2], pad, CPU, pack_len, attention))
        assert torch.allclose(packed, padded, atol=1e-5), (pack_len, attention)


def test_sequence_logps_sum_each_owner_chunked_or_not_in_value_and_gradient():
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 11, bias=False)
    hidden = torch.randn(2, 5, 6, requires_grad=True)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 7, 8, -100, 9]])
    owner = torch.tensor([[0, 0, 0, 0, 0], [1, 1, 1, 2, 2]])  # row 2 packs two sequences
    logp = torch.log_softmax(head(hidden), -1)
    expected = torch.stack([logp[0, 1, 3] + logp[0, 2, 4] + logp[0, 3, 5], logp[1, 0, 7] + logp[1, 1, 8],
                            logp[1, 3, 9]])  # position t predicts label t + 1
    plain = sequence_logps(hidden, head, labels, owner, 3)
    assert torch.allclose(plain, expected)
    weights = torch.tensor([1.0, -2.0, 0.5])
    grads = [torch.autograd.grad((sequence_logps(hidden, head, labels, owner, 3, chunk) * weights).sum(),
                                 [hidden, head.weight]) for chunk in (0, 2)]
    assert torch.allclose(sequence_logps(hidden, head, labels, owner, 3, 2), plain)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    none_trained = sequence_logps(hidden, head, torch.full_like(labels, -100), owner, 3)
    assert none_trained.tolist() == [0.0, 0.0, 0.0]
    none_trained.sum().backward()  # joined to the graph: a batch with no trained token still steps


def test_answer_tokens_count_the_trained_tokens_of_each_side(tokenizer):
    pairs, _ = build_preference_pairs(RECORDS[:1], tokenizer, 256)
    expected = [len(tokenizer("c b a", add_special_tokens=False).input_ids) + 1,  # + EOS
                len(tokenizer("c b q", add_special_tokens=False).input_ids) + 1]
    assert answer_tokens(pairs).tolist() == [expected]


def test_pair_tokens_computed_counts_rows_times_the_widest():
    pairs = [{"chosen_ids": [1] * 5, "rejected_ids": [1] * 3}, {"chosen_ids": [1] * 4, "rejected_ids": [1] * 2}]
    assert pair_tokens_computed(pairs, [0, 1]) == 4 * 5
    # packed into 7: 5 + 2 and 4 + 3 (best fit, longest first): 2 rows of 7
    assert pair_tokens_computed(pairs, [0, 1], pack_len=7) == 2 * 7
    assert pair_tokens_computed(pairs, [0, 1], pack_len=100) == 1 * 14
    # best fit into 8 would make rows of 5 + 3 and 4 + 2, 2 x 8; the tightest length of 2 rows is 7: 2 x 7
    assert tightest_pack_len([5, 4, 3, 2], 8) == 7 and pair_tokens_computed(pairs, [0, 1], pack_len=8) == 2 * 7
    assert tightest_pack_len([5, 4, 3, 2], 100) == 14 and tightest_pack_len([9, 1], 4) == 9  # longest alone: 9


def test_all_pair_logps_puts_every_pair_in_its_own_row(tiny_model, tokenizer):
    pairs, _ = build_preference_pairs(RECORDS, tokenizer, 256)
    rt = Runtime(CPU)
    logps = all_pair_logps(tiny_model, pairs, 2, tokenizer.pad_token_id, rt, contextlib.nullcontext())
    packed = all_pair_logps(tiny_model, pairs, 2, tokenizer.pad_token_id, rt, contextlib.nullcontext(), pack_len=256)
    assert logps.shape == (3, 2) and logps.dtype == torch.float64
    assert torch.allclose(packed, logps, atol=1e-4)
    head = tiny_model.get_output_embeddings()
    with torch.no_grad():
        for i in range(3):
            chosen, rejected = pair_logps(tiny_model, head, pairs, [i], tokenizer.pad_token_id, CPU)
            assert torch.allclose(logps[i], torch.stack([chosen[0], rejected[0]]).double(), atol=1e-4)
    assert not tiny_model.training  # left in the mode it came in
