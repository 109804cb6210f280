"""The preference losses (DPO, IPO, SimPO, ORPO) and token_logprobs against values worked out by hand."""
import math

import pytest
import torch

from common.data import IGNORE_INDEX
from common.losses import preference_losses, reward_accuracy, token_logprobs

# two pairs: summed answer log-likelihoods under the policy and the reference, and the answers' token counts
POLICY_CHOSEN, POLICY_REJECTED = [-4.0, -9.0], [-6.0, -5.0]
REFERENCE_CHOSEN, REFERENCE_REJECTED = [-5.0, -8.0], [-5.5, -6.0]
CHOSEN_TOKENS, REJECTED_TOKENS = [4, 3], [2, 5]


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def run(loss, beta, gamma=0.5):
    t = torch.tensor
    return preference_losses(loss, beta, t(POLICY_CHOSEN), t(POLICY_REJECTED), t(CHOSEN_TOKENS), t(REJECTED_TOKENS),
                             t(REFERENCE_CHOSEN), t(REFERENCE_REJECTED), simpo_gamma=gamma)


def test_dpo_is_minus_log_sigmoid_of_beta_times_the_log_ratio_difference():
    losses, chosen, rejected = run("dpo", 0.1)
    # pair 1: (-4 - -5) - (-6 - -5.5) = 1 + 0.5 = 1.5; pair 2: (-9 - -8) - (-5 - -6) = -1 - 1 = -2
    assert losses.tolist() == pytest.approx([-log_sigmoid(0.15), -log_sigmoid(-0.2)], abs=1e-12)
    assert chosen.tolist() == pytest.approx([0.1, -0.1]) and rejected.tolist() == pytest.approx([-0.05, 0.1])


def test_ipo_is_the_squared_distance_of_the_mean_token_ratio_difference_from_one_over_two_beta():
    losses, chosen, rejected = run("ipo", 0.5)
    # pair 1: 1/4 - (-0.5)/2 = 0.5; pair 2: -1/3 - 1/5 = -8/15; target 1 / (2 * 0.5) = 1
    assert losses.tolist() == pytest.approx([(0.5 - 1) ** 2, (-8 / 15 - 1) ** 2], abs=1e-12)
    assert chosen.tolist() == pytest.approx([0.5 * 0.25, 0.5 * -1 / 3])


def test_simpo_compares_mean_token_log_probs_with_a_margin_and_no_reference():
    losses, chosen, rejected = run("simpo", 2.0, gamma=0.5)
    # pair 1: 2 * (-4/4 - -6/2) - 0.5 = 3.5; pair 2: 2 * (-9/3 - -5/5) - 0.5 = -4.5
    assert losses.tolist() == pytest.approx([-log_sigmoid(3.5), -log_sigmoid(-4.5)], abs=1e-12)
    assert chosen.tolist() == pytest.approx([-2.0, -6.0]) and rejected.tolist() == pytest.approx([-6.0, -2.0])
    t = torch.tensor
    no_reference = preference_losses("simpo", 2.0, t(POLICY_CHOSEN), t(POLICY_REJECTED), t(CHOSEN_TOKENS),
                                     t(REJECTED_TOKENS))[0]
    assert torch.equal(no_reference, losses)


def test_orpo_adds_the_chosen_answers_nll_to_lambda_times_the_log_odds_ratio_loss():
    losses, chosen, rejected = run("orpo", 0.1)
    expected = []
    for pc, nc, pr, nr in zip(POLICY_CHOSEN, CHOSEN_TOKENS, POLICY_REJECTED, REJECTED_TOKENS, strict=True):
        mc, mr = pc / nc, pr / nr
        log_odds = (mc - math.log(1 - math.exp(mc))) - (mr - math.log(1 - math.exp(mr)))
        expected.append(-mc - 0.1 * log_sigmoid(log_odds))
    assert losses.tolist() == pytest.approx(expected, abs=1e-12)
    assert chosen.tolist() == pytest.approx([0.1 * -1.0, 0.1 * -3.0])


def test_losses_give_gradients_to_the_policy_only():
    chosen = torch.tensor([-4.0, -9.0], requires_grad=True)
    t = torch.tensor
    losses, _, _ = preference_losses("dpo", 0.1, chosen, t(POLICY_REJECTED), t(CHOSEN_TOKENS), t(REJECTED_TOKENS),
                                     t(REFERENCE_CHOSEN), t(REFERENCE_REJECTED))
    losses.sum().backward()
    # d/dx -log sigmoid(0.1 (x - c)) = -0.1 (1 - sigmoid(0.1 (x - c))): the chosen answer is pushed up
    expected = [-0.1 * (1 - 1 / (1 + math.exp(-0.15))), -0.1 * (1 - 1 / (1 + math.exp(0.2)))]
    assert chosen.grad.tolist() == pytest.approx(expected, abs=1e-9)


def test_reward_accuracy_counts_a_tie_as_half():
    assert reward_accuracy(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0])).tolist() == [1.0, 0.5, 0.0]


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="one of"):
        run("kto", 0.1)


def test_token_logprobs_pick_the_log_softmax_of_each_trained_next_token():
    logits = torch.tensor([[[0.0, 1.0, 2.0], [2.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1.0, 1.0, 1.0]]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 1, 0]])  # position 1 predicts 1, position 2 predicts 0
    logps, mask = token_logprobs(logits, labels)
    assert mask.tolist() == [[False, True, True, False]]
    expected = [0.0, 0.0 - math.log(math.exp(2) + 2), 0.5 - math.log(2 * math.exp(0.5) + 1), 0.0]
    assert logps[0].tolist() == pytest.approx(expected, abs=1e-6)
    window, window_mask = token_logprobs(logits[:, 1:], labels)  # logits of the last 3 positions only
    assert torch.equal(window, logps[:, 1:]) and torch.equal(window_mask, mask[:, 1:])
