"""sft/full-ft-pipeline on CPU (gloo): two pipeline stages in two processes, and 2 stages x 2 data-parallel ranks in
four, take the same steps as a plain single-process full fine-tune (PyTorch, no pipeline) on the same batches;
--resume continues exactly; final/ is one Hugging Face checkpoint (a safetensors shard per stage and an index)
that from_pretrained loads and that reproduces the pipeline's eval loss."""
import os
import shutil

import pytest
import torch

from common.config import UserError
from tests.conftest import REPO, load_recipe, read_metrics, run_script

pytestmark = pytest.mark.slow  # every test here trains
PIPELINE = REPO / "sft" / "full-ft-pipeline"
pipeline = load_recipe(PIPELINE)
# four steps, two of them warmup, at a rate that moves the tiny model; checkpoints at steps 2 and 4
ARGS = ["--report_to=none", "--log_every=1", "--max_steps=4", "--lr=1e-4", "--warmup_ratio=0.5", "--save_every=2"]
# fp32 on CPU: the pipeline's sums run in another order than one process's (measured: 8e-7 at most)
LOSS_TOLERANCE = 1e-5


def torchrun(out, n_processes: int, *args):
    from common.runtime import free_port

    proc = run_script(PIPELINE / "run.sh", f"--output_dir={out}", *ARGS, *args,
                      env_extra={"NGPU": str(n_processes), "MASTER_PORT": str(free_port())})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run_losses(out) -> list[float]:
    return [r["loss"] for r in read_metrics(out) if "loss" in r]


def plain_full_fine_tune_losses(steps: int, dp: int, *args) -> list[float]:
    """The same steps without a pipeline: the whole model in one process, each step's micro-batches (those of all dp
    ranks, from the recipe's own batch plan) through model(), the loss divided by the step's trained tokens, global
    clipping, AdamW, warmup then cosine."""
    from common.data import batch_stream, build_sft_examples, collate_left_padded, plan_batches, read_records
    from common.losses import count_trained_tokens, token_loss_sum
    from common.model import load_model, load_tokenizer, resolve_model_path
    from common.optim import warmup_cosine, weight_decay_groups

    cfg = pipeline.parse_config(pipeline.Config, [*ARGS, f"--max_steps={steps}", *args])
    model_dir = resolve_model_path(cfg.model_path)
    tokenizer = load_tokenizer(model_dir)
    examples, _ = build_sft_examples(read_records(cfg.data_path), tokenizer, cfg.max_seq_len, cfg.prompt_template,
                                     cfg.train_on_prompt, cfg.truncation)
    lengths = [len(e["input_ids"]) for e in examples]

    def rank_plan(rank):
        def plan(epoch):
            return plan_batches(lengths, cfg.batch_size, cfg.seed, epoch, cfg.group_by_length, rank, dp)
        return plan

    streams = [batch_stream(rank_plan(rank)) for rank in range(dp)]
    torch.manual_seed(cfg.seed)
    model = load_model(model_dir, "none", torch.float32).train()
    optimizer = torch.optim.AdamW(weight_decay_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.adam_betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, int(cfg.warmup_ratio * steps)))
    losses = []
    for _ in range(steps):
        micro = [collate_left_padded([examples[i] for i in next(stream)], tokenizer.pad_token_id)
                 for stream in streams for _ in range(cfg.grad_accum)]
        n_trained = sum(count_trained_tokens(b["labels"]) for b in micro)
        total = 0.0
        for batch in micro:
            labels = batch.pop("labels")
            loss = token_loss_sum(model(**batch, use_cache=False).logits, labels) / n_trained
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(total)
    return losses


def eval_loss_of(final_dir, eval_path) -> float:
    """Mean loss per trained token of a saved model over an eval file, in plain transformers."""
    from transformers import AutoModelForCausalLM

    from common.data import build_sft_examples, collate_left_padded, read_records
    from common.losses import count_trained_tokens, token_loss_sum
    from common.model import load_tokenizer

    tokenizer = load_tokenizer(final_dir)
    examples, _ = build_sft_examples(read_records(eval_path), tokenizer, 1024, "alpaca", False, "keep_answer")
    model = AutoModelForCausalLM.from_pretrained(final_dir, dtype=torch.float32).eval()
    loss_sum = n_tokens = 0
    with torch.no_grad():
        for start in range(0, len(examples), 8):
            batch = collate_left_padded(examples[start:start + 8], tokenizer.pad_token_id)
            labels = batch.pop("labels")
            loss_sum += float(token_loss_sum(model(**batch).logits, labels))
            n_tokens += count_trained_tokens(labels)
    return loss_sum / n_tokens


def probe_losses(stage_model, reloaded) -> tuple[float, float]:
    """The summed loss of one probe row from a one-stage pipeline's module in memory and from a model reloaded from
    its final/ (token_loss_sum over the reloaded logits)."""
    from common.losses import token_loss_sum

    ids = torch.tensor([[1, 345, 678, 910, 1112, 1314, 1516, 2]])
    positions = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        in_memory = stage_model(ids, torch.ones_like(ids), positions, labels=ids)
        logits = reloaded(input_ids=ids).logits
    return float(in_memory), float(token_loss_sum(logits, ids))


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory):
    """One run of two stages in two processes, shared by the tests below."""
    out = tmp_path_factory.mktemp("pp2") / "out"
    proc = torchrun(out, 2, "--pp=2")
    return {"out": out, "stdout": proc.stdout, "losses": run_losses(out)}


@pytest.mark.skipif(os.cpu_count() < 2, reason="two processes need two cores")
def test_two_stages_take_the_steps_of_a_plain_full_fine_tune(two_stages):
    assert "pipeline 2 stage(s) x 1 data-parallel (FSDP2) x 1 tensor-parallel = 2 process(es)" in two_stages["stdout"]
    assert "stages: 2 layers (2.1M), 2 layers (2.1M)" in two_stages["stdout"]  # embedding vs head: balanced
    reference = plain_full_fine_tune_losses(4, 1)
    assert two_stages["losses"] == pytest.approx(reference, abs=LOSS_TOLERANCE)
    assert reference[-1] < reference[0] - 0.3  # it learns: 7.66 -> 7.23 nats in four steps


@pytest.mark.skipif(os.cpu_count() < 2, reason="two processes need two cores")
def test_consolidated_final_loads_and_reproduces_the_pipeline_eval_loss(two_stages):
    import json

    final = two_stages["out"] / "final"
    index = json.loads((final / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors",
                                                         "model-00002-of-00002.safetensors"]
    assert index["weight_map"]["model.embed_tokens.weight"] == "model-00001-of-00002.safetensors"
    assert index["weight_map"]["lm_head.weight"] == "model-00002-of-00002.safetensors"
    assert index["weight_map"]["model.layers.3.mlp.down_proj.weight"] == "model-00002-of-00002.safetensors"
    evals = [r["eval_loss"] for r in read_metrics(two_stages["out"]) if "eval_loss" in r]
    assert len(evals) == 2 and evals[-1] < evals[0] - 0.5
    reloaded = eval_loss_of(final, REPO / "data" / "sft" / "eval.jsonl")
    assert reloaded == pytest.approx(evals[-1], rel=1e-5)


@pytest.mark.skipif(os.cpu_count() < 2, reason="two processes need two cores")
def test_resume_of_two_stages_continues_exactly(two_stages, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(two_stages["out"], out)
    shutil.rmtree(out / "checkpoints" / "step_00000004")
    (out / "checkpoints" / ".step_00000006.tmp").mkdir()  # what a crash while saving would leave: never picked
    proc = torchrun(out, 2, "--pp=2", "--resume")
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    resumed = [r for r in read_metrics(out) if "loss" in r][-2:]
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["loss"] for r in resumed] == pytest.approx(two_stages["losses"][2:], abs=1e-6)


@pytest.mark.skipif(os.cpu_count() < 2, reason="four processes on two cores: slow but fits")
@pytest.mark.parametrize("tp", [1, 2], ids=["pp2-dp2", "pp2-tp2"])
def test_two_stages_by_two_data_parallel_or_two_tensor_parallel_in_four_processes(tp, tmp_path):
    """pp 2 x dp 2: each stage sharded over two FSDP2 ranks reading different batches; pp 2 x tp 2: each stage's
    heads and MLP columns split over two ranks, the activations between stages split along the sequence. The eval
    runs through the pipeline too and final/ reproduces it."""
    tensor_parallel, dp = tp == 2, 4 // (2 * tp)
    mode = f"{dp} data-parallel (FSDP2) x {tp} tensor-parallel"
    args = ["--pp=2", "--batch_size=2", "--grad_accum=2", "--max_steps=2", "--save_every=0", "--eval_data_path=",
            f"--tp={tp}"]
    eval_args = [f"--eval_data_path={REPO / 'data' / 'sft' / 'eval.jsonl'}"] if tensor_parallel else []
    proc = torchrun(tmp_path / "out", 4, *args, *eval_args)
    assert f"pipeline 2 stage(s) x {mode} = 4 process(es)" in proc.stdout
    reference = plain_full_fine_tune_losses(2, dp, *args)
    assert run_losses(tmp_path / "out") == pytest.approx(reference, abs=LOSS_TOLERANCE)
    if tensor_parallel:
        evals = [r["eval_loss"] for r in read_metrics(tmp_path / "out") if "eval_loss" in r]
        reloaded = eval_loss_of(tmp_path / "out" / "final", REPO / "data" / "sft" / "eval.jsonl")
        assert len(evals) == 2 and reloaded == pytest.approx(evals[-1], rel=1e-5)


def test_one_process_default_matches_the_plain_loop_and_mistakes_are_one_line(tmp_path):
    result = pipeline.main(pipeline.parse_config(pipeline.Config, [f"--output_dir={tmp_path / 'one'}", *ARGS,
                                                                   "--eval_data_path="]))
    assert result["losses"] == pytest.approx(plain_full_fine_tune_losses(4, 1), abs=LOSS_TOLERANCE)
    assert (result["final_dir"] / "model.safetensors").is_file()
    # the trained stage in memory and final/ through from_pretrained: the same loss on a probe row
    from transformers import AutoModelForCausalLM

    in_memory, reloaded = probe_losses(result["stage_model"], AutoModelForCausalLM.from_pretrained(result["final_dir"]))
    assert in_memory == pytest.approx(reloaded, rel=1e-6)
    cases = {"--pp=2": "must be a whole multiple of pp x tp",  # one process cannot hold two stages
             "--tp=3": "must be a whole multiple of pp x tp",
             "--stage_layers=3,3": "expected 1 whole numbers",
             "--grad_accum=0": "--grad_accum=0"}
    for arg, needle in cases.items():
        cfg = pipeline.parse_config(pipeline.Config, [f"--output_dir={tmp_path / 'bad'}", *ARGS, arg])
        with pytest.raises(UserError, match=needle):
            pipeline.main(cfg)


def nan_on_training_step(n, real):
    """run_pipeline, except that its n-th training step comes out nan: the loss and every gradient (the schedule
    also calls the loss once per new row length, on stand-in tensors, so the loss itself cannot count steps)."""
    calls = {"training": 0}

    def run(pipelines, stage_model, rows, scale, training, *rest):
        value = real(pipelines, stage_model, rows, scale, training, *rest)
        calls["training"] += training
        if not training or calls["training"] != n:
            return value
        for param in stage_model.parameters():
            param.grad.mul_(float("nan"))
        return float("nan")
    return run


def test_nan_loss_stops_before_the_update_or_is_skipped(tmp_path, monkeypatch):
    from common.losses import NonFiniteLoss

    args = ["--max_steps=6", "--save_every=2", "--eval_data_path=", "--grad_accum=1", "--report_to=none"]
    real = pipeline.run_pipeline
    monkeypatch.setattr(pipeline, "run_pipeline", nan_on_training_step(4, real))
    with pytest.raises(NonFiniteLoss, match=r"step 4: loss nan, .*stopped before updating the weights"):
        pipeline.main(pipeline.parse_config(pipeline.Config, [f"--output_dir={tmp_path / 'stop'}", *args]))
    assert [p.name for p in (tmp_path / "stop" / "checkpoints").iterdir()] == ["step_00000002"]
    monkeypatch.setattr(pipeline, "run_pipeline", nan_on_training_step(4, real))
    result = pipeline.main(pipeline.parse_config(pipeline.Config, [f"--output_dir={tmp_path / 'skip'}", *args,
                                                                   "--on_nan=skip"]))
    assert [r["step"] for r in read_metrics(tmp_path / "skip") if "loss" in r] == [1, 2, 3, 5, 6]
    assert all(torch.isfinite(p.full_tensor()).all() for p in result["stage_model"].parameters())


def test_a_tied_lm_head_trains_in_one_stage_and_is_saved_once(tiny_dir, tmp_path):
    """SmolLM2, Llama 3.2 1B/3B and small Qwen2 tie the LM head to the embedding: one stage holds both ends, reads the
    one stored tensor for both and writes it once, as Hugging Face does (measured on SmolLM2-135M-Instruct: eval
    loss 1.398 -> 1.199 in 3 steps, final/ reloads tied)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from common.model import load_tokenizer

    config = AutoConfig.from_pretrained(tiny_dir)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    tied = tmp_path / "tied"
    AutoModelForCausalLM.from_config(config).save_pretrained(tied)
    load_tokenizer(tiny_dir).save_pretrained(tied)
    assert "lm_head.weight" not in load_file(tied / "model.safetensors")
    result = pipeline.main(pipeline.parse_config(pipeline.Config, [f"--output_dir={tmp_path / 'out'}", *ARGS,
                                                                   f"--model_path={tied}", "--eval_data_path="]))
    assert result["losses"][-1] < result["losses"][0]
    saved = load_file(result["final_dir"] / "model.safetensors")
    assert "lm_head.weight" not in saved and "model.embed_tokens.weight" in saved
    reloaded = AutoModelForCausalLM.from_pretrained(result["final_dir"])
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    in_memory, from_final = probe_losses(result["stage_model"], reloaded)
    assert in_memory == pytest.approx(from_final, rel=1e-6)
