"""rlhf/grpo-qlora: the objective, the group advantages and the bundled rewards against hand-computed values, the
reference adapter switch, and end-to-end runs on CPU with the tiny model and a real bitsandbytes NF4 base (from an
SFT adapter, with a cls/reward-qlora reward model, resumed, and a bad reward function)."""
import math
import shutil

import pytest
import torch

from common.inference import load_reward_function
from common.runtime import Runtime
from tests.conftest import REPO, load_recipe, nan_on_call, read_metrics, run_script
from tests.tools.conftest import load_tool, one_thread

RECIPE = REPO / "rlhf" / "grpo-qlora"
grpo = load_recipe(RECIPE)
DATA = REPO / "data" / "synthetic"
# small steps: 2 micro-batches of 1 prompt x 4 completions of at most 8 tokens (the synthetic answers take at most 7
# with EOS)
FAST = ["--report_to=none", "--batch_size=1", "--grad_accum=2", "--group_size=4", "--max_new_tokens=8",
        "--eval_data_path="]


def run_main(out, *args):
    return grpo.main(grpo.parse_config(grpo.Config, [f"--output_dir={out}", *FAST, *args]))


def test_group_advantages_are_exact():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 3.0, 0.0, 1.0])
    std = math.sqrt(4 * 0.5 ** 2 / 3)  # sample std of (1, 0, 0, 1)
    expected = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4)] * 2
    expected = [expected[0], expected[1], expected[1], expected[0], 0.0, 0.0, 0.0, 0.0]
    std3 = math.sqrt(((0 - 1) ** 2 + (3 - 1) ** 2 + (0 - 1) ** 2 + 0) / 3)  # (0, 3, 0, 1): mean 1
    expected += [-1 / (std3 + 1e-4), 2 / (std3 + 1e-4), -1 / (std3 + 1e-4), 0.0]
    assert grpo.group_advantages(rewards, 4).tolist() == pytest.approx(expected, abs=1e-12)
    centred = [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -1, 2, -1, 0]
    assert grpo.group_advantages(rewards, 4, scale=False).tolist() == pytest.approx(centred, abs=1e-12)


def test_clipped_objective_and_kl_against_hand_computed_values():
    """Two completions (advantages +1 and -2), clip_eps 0.2, kl_beta 0.1; the last column of row 0 is a pad."""
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -1.5, -0.2]], requires_grad=True)
    ratios = torch.tensor([[1.5, 0.9, 1.0], [0.5, 1.1, 1.3]])
    old = logps.detach() - ratios.log()
    to_ref = torch.tensor([[0.1, -0.2, 0.0], [0.3, 0.0, -0.4]])  # ref - logp
    mask = torch.tensor([[True, True, False], [True, True, True]])
    losses, kl, clipped = grpo.grpo_token_losses(logps, old, logps.detach() + to_ref, torch.tensor([1.0, -2.0]),
                                                 0.2, 0.1)
    # -min(r A, clip(r, 0.8, 1.2) A): 1.5 -> -1.2 (clipped), 0.9 -> -0.9; with A = -2: 0.5 -> 1.6 (clipped, 0.8 * 2),
    # 1.1 -> 2.2, 1.3 -> 2.6 (1.3 * 2 > 1.2 * 2: the unclipped term is the smaller, no clip)
    policy = [-1.2, -0.9, 1.6, 2.2, 2.6]
    k3 = [math.exp(d) - d - 1 for d in (0.1, -0.2, 0.3, 0.0, -0.4)]
    assert losses[mask].tolist() == pytest.approx([p + 0.1 * k for p, k in zip(policy, k3)], abs=1e-6)
    assert kl[mask].tolist() == pytest.approx(k3, abs=1e-6)
    assert clipped[mask].tolist() == [True, False, True, False, False]
    # the gradient at ratio 1 (one update per batch: logp_old = logp) is -A + beta (1 - exp(ref - logp)) per token
    losses, _, _ = grpo.grpo_token_losses(logps, logps.detach(), logps.detach() + to_ref, torch.tensor([1.0, -2.0]),
                                          0.2, 0.1)
    (losses * mask).sum().backward()
    expected = [[-1 + 0.1 * (1 - math.exp(d)) for d in (0.1, -0.2)] + [0.0],
                [2 + 0.1 * (1 - math.exp(d)) for d in (0.3, 0.0, -0.4)]]
    assert logps.grad.tolist()[0] == pytest.approx(expected[0], abs=1e-6)
    assert logps.grad.tolist()[1] == pytest.approx(expected[1], abs=1e-6)


def test_reference_adapter_is_the_frozen_start_and_switching_back_keeps_what_trains(tmp_path, tiny_dir):
    from common.model import add_lora, load_model
    from common.optim import make_optimizer

    start = add_lora(load_model(tiny_dir, "none"), 8, 16, 0.0, ["all-linear"], modules_to_save=["lm_head"])
    with torch.no_grad():
        for name, p in start.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # an adapter that changes the outputs, like a trained SFT adapter
    start.save_pretrained(tmp_path / "sft")
    cfg = grpo.Config(init_adapter=str(tmp_path / "sft"), quantization="none", kl_beta=0.04)
    model = grpo.load_policy(cfg, tiny_dir, tmp_path / "sft", torch.float32, Runtime(torch.device("cpu")))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default" in n for n in trainable)
    assert any("lm_head" in n for n in trainable) and any(".reference" in n for n, _ in model.named_parameters())
    optimizer = make_optimizer(model, "adamw", 1e-3, 0.0, torch.device("cpu"))
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    ids = torch.tensor([[1, 300, 301, 302, 303]])
    with torch.no_grad():
        at_start = model(input_ids=ids).logits
        for name, p in model.named_parameters():
            if "lora_B.default" in name:
                p.add_(0.1)  # the policy moves away from the start
        moved = model(input_ids=ids).logits
        with grpo.reference_policy(model):
            reference = model(input_ids=ids).logits
    assert not torch.allclose(moved, at_start, atol=1e-3)
    torch.testing.assert_close(reference, at_start)  # the reference is the starting adapter, not the moved one
    assert model.active_adapter == "default"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert {id(p) for p in model.parameters() if p.requires_grad} == optimized
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, moved)


def test_bundled_rewards():
    def reward(name):
        return load_reward_function(f"{RECIPE / 'rewards.py'}:{name}")

    records = [{"answer": "g i c c"}, {"answer": "g i c c"}, {"answer": "g i c c"}, {"answer": None}]
    completions = [" g i c c\n", "g i c", "g c i c d", "x"]
    assert reward("exact_match")([""] * 4, completions, records) == [1.0, 0.0, 0.0, 0.0]
    assert reward("format_check")([""] * 4, completions, records) == [1.0, 0.0, 0.0, 0.0]
    assert reward("position_match")([""] * 4, completions, records) == [1.0, 0.75, 0.4, 0.0]
    assert reward("score")([""] * 4, completions, records) == [2.0, 0.75, 0.4, 0.0]


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory):
    """An sft/qlora adapter on the synthetic reversal task, trained once per module: 200 steps, held-out exact
    match about 0.5. The tiny random-init model learns reversal in a burst (0.00 at 100 steps, 0.07 at 125, 0.38 at
    150, 0.53 at 200; 1.00 by 300 steps of a longer schedule), in fp32 with the embeddings trained; with them frozen
    it was at 0.01 after 150 steps, on NF4 at 0.00 after 120."""
    sft = load_recipe(REPO / "sft" / "qlora")
    out = tmp_path_factory.mktemp("sft")
    with one_thread():
        sft.main(sft.parse_config(sft.Config, [
            f"--output_dir={out}", f"--data_path={DATA / 'reverse_train.jsonl'}", "--eval_data_path=",
            "--quantization=none", "--max_steps=200", "--batch_size=16", "--grad_accum=1", "--lr=1e-3",
            "--lora_r=64", "--lora_alpha=64", "--max_grad_norm=1", "--lora_modules_to_save=lm_head,embed_tokens",
            "--report_to=none", "--log_every=50"]))
    return out / "final"


@pytest.mark.slow
def test_grpo_from_an_sft_adapter_raises_held_out_exact_match_as_tools_evaluate_measures(tmp_path, sft_adapter):
    """The SFT -> GRPO pipeline on the synthetic task with the default reward (exact match + position match):
    greedy exact match on the held-out prompts, measured by tools/evaluate.py before and after, rises (0.53 ->
    0.59 / 0.62 / 0.59 over three sampling seeds in 80 steps; README.md), the held-out reward rises and the reference
    answers get likelier. The recipe's own held-out evals are tools/evaluate.py's numbers."""
    evaluate = load_tool("evaluate")
    data = DATA / "reverse_eval.jsonl"
    with one_thread():
        result = run_main(tmp_path / "out", f"--init_adapter={sft_adapter}", "--quantization=none",
                          f"--eval_data_path={data}", "--batch_size=8", "--grad_accum=1", "--group_size=8",
                          "--temperature=0.7", "--max_steps=80", "--lr=3e-4")
        before, after = (evaluate.main(["--model=tiny", f"--adapter={adapter}", f"--data={data}", "--max_new_tokens=8",
                                        "--batch_size=50"]) for adapter in (sft_adapter, result["final_dir"]))
    first, last = result["first_eval"], result["eval"]
    assert (first["eval_exact_match"], last["eval_exact_match"]) == (before["exact_match"], after["exact_match"])
    assert first["eval_loss"] == pytest.approx(before["loss"], rel=1e-4)
    assert last["eval_loss"] == pytest.approx(after["loss"], rel=1e-4)
    assert 0.35 <= before["exact_match"] <= 0.7, before  # partly right: the SFT adapter learnt the task in part
    assert after["exact_match"] >= before["exact_match"] + 0.04, (before, after)  # 100 prompts: 4 more right at least
    assert last["eval_reward"] > first["eval_reward"] + 0.05, (first, last)  # the reward it was trained on
    assert after["loss"] < before["loss"], (before, after)  # the reference answers got likelier
    rewards = result["rewards"]
    assert sum(rewards[-20:]) > sum(rewards[:20]), rewards  # the sampled answers score higher too


@pytest.mark.slow
def test_bad_reward_function_is_one_clear_line(tmp_path):
    rewards = tmp_path / "rewards.py"
    rewards.write_text("def score(prompts, completions, records):\n    return [0.0] * len(completions)\n")
    proc = run_script(RECIPE / "run.sh", f"--reward_fn={rewards}:scroe", f"--output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: --reward_fn={rewards}:scroe: {rewards} has no function 'scroe'; expected one of score, called as "
        "scroe(prompts, completions, records)")


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    """Two updates per generation batch (old log-probs taken first), a KL term, a reward that varies: the resumed
    run samples the same completions and takes the same steps as the straight one."""
    rewards = tmp_path / "length.py"
    rewards.write_text("def score(prompts, completions, records):\n    return [float(len(c)) for c in completions]\n")
    args = [f"--reward_fn={rewards}", "--max_steps=4", "--save_every=2", "--updates_per_batch=2", "--lr=5e-3",
            "--log_every=1"]
    with one_thread():
        straight = run_main(tmp_path / "a", *args)
        shutil.copytree(tmp_path / "a", tmp_path / "b")
        shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_00000004")
        resumed = run_main(tmp_path / "b", *args, "--resume")
    assert resumed["steps"] == 2
    assert resumed["losses"] == pytest.approx(straight["losses"][2:], abs=1e-6)
    assert resumed["rewards"] == straight["rewards"][2:] and len(set(straight["rewards"])) > 1
    rows = [r for r in read_metrics(tmp_path / "a") if "loss" in r]
    for key in ("loss", "reward", "reward_std", "kl", "clip_fraction", "completion_len", "gen_tokens_per_s",
                "train_tokens_per_s", "lr", "grad_norm"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert rows[0]["kl"] < rows[-1]["kl"]  # a fresh adapter starts at the reference (the base) and moves away
    assert max(r["clip_fraction"] for r in rows) > 0  # the second update of a batch meets the clip


@pytest.mark.slow
def test_reward_model_path_end_to_end(tmp_path):
    """A reward model trained by cls/reward-qlora for a few steps, then two GRPO steps scored by it and by the
    bundled reward function: both logged, and the reward is their sum."""
    reward_qlora = load_recipe(REPO / "cls" / "reward-qlora")
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join((DATA / "reverse_eval.jsonl").read_text().splitlines(keepends=True)[:4]))
    with one_thread():
        reward_qlora.main(reward_qlora.parse_config(reward_qlora.Config, [
            f"--output_dir={tmp_path / 'rm'}", "--max_steps=3", "--batch_size=4", "--report_to=none",
            "--eval_data_path="]))
        result = run_main(tmp_path / "out", f"--reward_model={tmp_path / 'rm' / 'final'}", "--max_steps=2",
                          f"--eval_data_path={eval_file}")
    rows = [r for r in read_metrics(tmp_path / "out") if "loss" in r]
    assert len(rows) == 2
    for r in rows:
        assert r["reward"] == pytest.approx(r["reward_fn"] + r["reward_model"], abs=1e-9)
        assert r["reward_std"] > 0  # the reward model tells completions apart
    expected = {"eval_loss", "eval_reward", "eval_reward_fn", "eval_reward_model", "eval_exact_match"}
    assert set(result["eval"]) == expected and math.isfinite(result["eval"]["eval_loss"])
    assert (result["final_dir"] / "adapter_model.safetensors").is_file()
    assert not (result["final_dir"] / "reference").exists()


@pytest.mark.slow
def test_a_nan_loss_stops_before_the_update_or_is_skipped(tmp_path, monkeypatch):
    from common.losses import NonFiniteLoss

    real = grpo.grpo_token_losses
    args = ["--max_steps=3", "--save_every=1", "--log_every=1"]
    with one_thread():
        # the third call: the first micro-batch of step 2 (grad_accum=2 in FAST)
        monkeypatch.setattr(grpo, "grpo_token_losses", nan_on_call(3, real))
        with pytest.raises(NonFiniteLoss, match=r"step 2: loss nan, .*stopped before updating the weights \(last "
                                                r"checkpoint: .*step_00000001\)"):
            run_main(tmp_path / "stop", *args)
        monkeypatch.setattr(grpo, "grpo_token_losses", nan_on_call(3, real))
        result = run_main(tmp_path / "skip", *args, "--on_nan=skip")
    assert [r["step"] for r in read_metrics(tmp_path / "skip") if "loss" in r] == [1, 3]
    assert all(math.isfinite(x) for x in result["losses"]) and len(result["losses"]) == 2
