"""rlhf/dpo-qlora end to end on CPU with the tiny model and a real bitsandbytes NF4 base: held-out reward accuracy
from a coin flip to at least 0.8 with the chosen answers more likely than before, every loss starting where its
formula says (the policy is the stored reference at step 1), an SFT adapter as the start and the reference, an exact
resume that reads the stored reference back, two ranks computing the same reference as one, and one-line errors."""
import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, load_recipe, nan_on_call, read_jsonl, read_metrics, run_script

RECIPE = REPO / "rlhf" / "dpo-qlora"
dpo = load_recipe(RECIPE)
PAIRS = REPO / "data" / "synthetic" / "reverse_preference_train.jsonl"
FAST = ["--report_to=none", "--log_every=1", "--eval_data_path="]


def run_main(out, *args):
    return dpo.main(dpo.parse_config(dpo.Config, [f"--output_dir={out}", *FAST, *args]))


@pytest.fixture(scope="module")
def few_pairs(tmp_path_factory):
    """The first 24 bundled pairs: three steps of 8."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(PAIRS.read_text(encoding="utf-8").splitlines(keepends=True)[:24]), encoding="utf-8")
    return path


@pytest.mark.slow
def test_run_sh_default_learns_the_preference_and_keeps_the_chosen_answers_likely(tmp_path):
    out = tmp_path / "out"
    proc = run_script(RECIPE / "run.sh", f"--output_dir={out}", "--report_to=none", "--log_every=1",
                      env_extra={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_metrics(out)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 40 and losses[0] == pytest.approx(math.log(2), abs=1e-6)  # the policy is the reference
    assert sum(losses[-10:]) / 10 < math.log(2) - 0.05, losses
    results = json.loads((out / "eval_results.json").read_text())
    start = results["at_start"]
    assert start["eval_reward_accuracy"] == 0.5 and start["eval_loss"] == pytest.approx(math.log(2), abs=1e-9)
    assert results["eval_reward_accuracy"] >= 0.8 and results["pairs"] == 100, results
    assert results["eval_logps_chosen"] > start["eval_logps_chosen"], results  # not bought by making both unlikely
    assert results["eval_reward_margin"] > 0
    assert results["eval_reward_accuracy"] == [r for r in rows if "eval_loss" in r][-1]["eval_reward_accuracy"]
    reference = load_file(out / dpo.REFERENCE_FILE)
    assert reference["train"].shape == (320, 2) and reference["eval"].shape == (100, 2)
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (out / "final" / name).is_file(), name
    assert "reward acc" in proc.stdout and "reference log-probs of 420 pairs computed" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("loss, first_loss", [("ipo", (0 - 1 / (2 * 0.1)) ** 2), ("simpo", None), ("orpo", None)])
def test_every_loss_trains_from_its_formulas_starting_value(loss, first_loss, few_pairs, tmp_path):
    result = run_main(tmp_path / "out", f"--data_path={few_pairs}", f"--loss={loss}", "--max_steps=3")
    assert all(math.isfinite(x) for x in result["losses"]) and len(result["losses"]) == 3
    if first_loss is not None:  # ipo: ((pc - rc) - (pr - rr) - 1/(2 beta))^2 with the policy at the reference
        assert result["losses"][0] == pytest.approx(first_loss, abs=1e-6)
        assert (tmp_path / "out" / dpo.REFERENCE_FILE).is_file()
    else:  # reference-free
        assert not (tmp_path / "out" / dpo.REFERENCE_FILE).exists()
    assert result["losses"][-1] < result["losses"][0]


@pytest.mark.slow
def test_packed_answers_train_as_the_same_pairs_padded(few_pairs, tmp_path):
    """--packing: a micro-batch's 16 answers in packed rows (restarting positions, a block mask) give the reference,
    the log-likelihoods and the losses of the left-padded rows, one answer each, with fewer tokens computed (these
    pairs are much alike: 0.981 of the padded rows' tokens are answers, 0.997 of the packed ones')."""
    args = [f"--data_path={few_pairs}", "--max_steps=3"]
    padded = run_main(tmp_path / "padded", *args)
    packed = run_main(tmp_path / "packed", *args, "--packing=true")
    reference = [load_file(tmp_path / run / dpo.REFERENCE_FILE)["train"] for run in ("padded", "packed")]
    assert torch.allclose(reference[1], reference[0], atol=1e-4)
    assert packed["losses"] == pytest.approx(padded["losses"], rel=1e-3)
    assert packed["losses"][-1] < packed["losses"][0]  # it learns: not log 2 throughout
    first = [read_metrics(tmp_path / run)[0] for run in ("padded", "packed")]
    assert first[0]["step"] == first[1]["step"] == 1
    for key in ("logps_chosen", "logps_rejected"):  # the policy before any update: the same numbers
        assert first[1][key] == pytest.approx(first[0][key], rel=1e-5)
    assert packed["tokens"] == padded["tokens"] and packed["tokens_computed"] < padded["tokens_computed"]


@pytest.mark.slow
def test_resume_reads_the_stored_reference_and_continues_exactly(few_pairs, tmp_path):
    args = [f"--data_path={few_pairs}", "--max_steps=3", "--save_every=1", "--keep_last=3"]
    first = run_main(tmp_path / "out", *args)
    reference = tmp_path / "out" / dpo.REFERENCE_FILE
    written = reference.stat().st_mtime_ns
    shutil.rmtree(tmp_path / "out" / "checkpoints" / "step_00000003")
    shutil.rmtree(tmp_path / "out" / "checkpoints" / "step_00000002")
    resumed = run_main(tmp_path / "out", *args, "--resume")
    assert resumed["steps"] == 2
    assert resumed["losses"] == pytest.approx(first["losses"][1:], abs=1e-6)
    assert reference.stat().st_mtime_ns == written  # read back, not recomputed from the trained adapter


@pytest.mark.slow
def test_an_sft_adapter_is_the_start_and_the_reference(few_pairs, tmp_path):
    sft = load_recipe(REPO / "sft" / "qlora")
    sft_final = sft.main(sft.parse_config(sft.Config, [
        f"--output_dir={tmp_path / 'sft'}", "--max_steps=2", "--batch_size=4", "--grad_accum=1", "--lr=1e-2",
        "--lora_r=8", "--report_to=none", "--eval_data_path="]))["final_dir"]
    from_sft = run_main(tmp_path / "dpo", f"--data_path={few_pairs}", f"--init_adapter={sft_final}", "--max_steps=1")
    run_main(tmp_path / "base", f"--data_path={few_pairs}", "--max_steps=1")
    assert from_sft["losses"][0] == pytest.approx(math.log(2), abs=1e-6)  # the SFT model is its own reference
    with_sft, bare = (load_file(tmp_path / d / dpo.REFERENCE_FILE)["train"] for d in ("dpo", "base"))
    assert not torch.allclose(with_sft, bare)  # the reference is the SFT model, not the base
    config = json.loads((from_sft["final_dir"] / "adapter_config.json").read_text())
    assert config["r"] == 8  # the SFT adapter kept training (not a fresh r=16 one)


def test_inspect_data_reports_pairs_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    result = dpo.main(dpo.parse_config(dpo.Config, [f"--output_dir={out}", "--inspect_data"]))
    printed = capsys.readouterr().out
    assert result["inspect_data"] and not out.exists()
    assert f"data     train {PAIRS}: 320 pairs" in printed
    assert printed.count("[[") == 2  # the chosen and the rejected answer of the first pair, marked as trained
    assert result["train_stats"].examples == len(read_jsonl(PAIRS))


def test_bad_pair_and_bad_beta_are_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a", "rejected": 3}\n')
    proc = run_script(RECIPE / "run.sh", f"--data_path={bad}", f"--output_dir={tmp_path / 'out'}", "--inspect_data")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == f"error: {bad}:2: field 'rejected' must be a string, got int"
    with pytest.raises(dpo.UserError, match=r"--beta=-1.0: expected a positive number"):
        run_main(tmp_path / "o", "--beta=-1")


@pytest.mark.slow
@pytest.mark.skipif(os.cpu_count() < 2, reason="two processes need two cores")
def test_two_ranks_compute_the_reference_of_one_and_train(few_pairs, tmp_path):
    one = run_main(tmp_path / "one", f"--data_path={few_pairs}", "--max_steps=1")
    assert one["losses"]
    out = tmp_path / "two"
    proc = run_script(RECIPE / "run.sh", f"--output_dir={out}", f"--data_path={few_pairs}", "--max_steps=2",
                      "--batch_size=4", "--report_to=none", "--eval_data_path=", "--log_every=1",
                      env_extra={"NGPU": "2", "MASTER_PORT": "29641", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "torchrun, 2 processes" in proc.stdout
    torch.testing.assert_close(load_file(out / dpo.REFERENCE_FILE)["train"],
                               load_file(tmp_path / "one" / dpo.REFERENCE_FILE)["train"], atol=1e-4, rtol=0)
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 2 and losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert (out / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_a_nan_loss_stops_before_the_update_or_is_skipped(few_pairs, tmp_path, monkeypatch):
    from common.losses import NonFiniteLoss, preference_losses

    args = [f"--data_path={few_pairs}", "--max_steps=3", "--save_every=1"]
    monkeypatch.setattr(dpo, "preference_losses", nan_on_call(2, preference_losses))  # the batch of step 2
    with pytest.raises(NonFiniteLoss, match=r"step 2: loss nan, .*stopped before updating the weights \(last "
                                            r"checkpoint: .*step_00000001\)"):
        run_main(tmp_path / "stop", *args)
    monkeypatch.setattr(dpo, "preference_losses", nan_on_call(2, preference_losses))
    result = run_main(tmp_path / "skip", *args, "--on_nan=skip")
    assert [r["step"] for r in read_metrics(tmp_path / "skip") if "loss" in r] == [1, 3]
    assert all(math.isfinite(x) for x in result["losses"]) and len(result["losses"]) == 2
