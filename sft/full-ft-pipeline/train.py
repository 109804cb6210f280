"""Full-parameter supervised fine-tuning of a Llama-family model split into pipeline stages
(torch.distributed.pipelining, 1F1B), each stage optionally split over tensor-parallel ranks (--tp) and sharded with
FSDP2 over the data-parallel replicas that hold it: world = pp x dp x tp. Each process builds its stage on the meta
device and reads only its own layers from the safetensors files, so a 65B never sits whole in any process.

Default run, no GPU, no download (tiny random-init Llama, bundled English/Chinese sample data), about a minute:
    cd sft/full-ft-pipeline && bash run.sh
Two stages in two processes (CPU or 2 GPUs), then 8 GPUs as 4 stages x 2 data-parallel, then two nodes:
    NGPU=2 bash run.sh --pp=2
    NGPU=8 bash run.sh --pp=4 --model_path=/models/Llama-2-13b-hf --data_path=train.jsonl --grad_accum=8
    NNODES=2 NODE_RANK=0|1 MASTER_ADDR=node0 NGPU=8 bash run.sh --pp=8 --model_path=/models/llama-65b ...
Data as the other sft recipes (alpaca, {"input","target"} or chat {"messages"}; .jsonl, .json, .jsonl.zst). Writes
output_dir/: final/ (one Hugging Face checkpoint: config.json, model-0000k-of-0000n.safetensors + index, tokenizer),
config.json, metrics.jsonl, loss.png, checkpoints/ (torch.distributed.checkpoint, sharded per stage and rank).
Memory per GPU, roughly: 16 bytes x parameters / (pp x dp x tp) (fp32 weights, gradients, AdamW) + activations of
`grad_accum` micro-batches in flight (`tools/estimate_memory.py --method=full --pp --tp --gpus`).
"""
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from common.checkpoint import (
    latest_checkpoint,
    load_dcp_checkpoint,
    prepare_output_dir,
    resume_checkpoint,
    save_dcp_checkpoint,
)
from common.config import UserError, config_to_dict, exit_on_user_error, parse_config
from common.data import (
    IGNORE_INDEX,
    batch_stream,
    build_sft_examples,
    collate_left_padded,
    plan_batches,
    read_records,
    sft_data_report,
)
from common.logs import StepLogger, memory_gb, peak_memory_gb, quiet_third_party_logs
from common.losses import is_finite, non_finite_error
from common.model import load_tokenizer, resolve_attention, resolve_model_path
from common.optim import warmup_cosine, weight_decay_groups
from common.pipeline import build_pipeline_stage, clip_grad_norm_across_stages, save_pipeline_final
from common.runtime import (
    all_reduce_sum,
    catch_stop_signals,
    cleanup,
    set_single_process_env,
    setup_runtime,
    stop_requested,
    training_precision,
)

SAMPLE_DATA = Path(__file__).resolve().parents[2] / "data" / "sft"


@dataclass
class Config:
    # model and parallelism
    model_path: str = "tiny"  # 'tiny' (random-init test Llama) or a local Hugging Face folder with safetensors
    pp: int = 1  # pipeline stages; the processes are pp x dp x tp, the dp ranks of a stage share it with FSDP2
    tp: int = 1  # tensor-parallel ranks per stage replica (attention heads and MLP columns split; within a node)
    stage_layers: str = ""  # decoder layers per stage, e.g. '21,20,20,19'; '': balanced by parameters
    schedule: Literal["1f1b", "gpipe"] = "1f1b"  # 1f1b: at most pp micro-batches' activations alive per stage
    gradient_checkpointing: bool | None = None  # recompute activations in backward (less memory); None: on with a GPU
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"  # auto: FA2 on GPU if installed
    # data
    data_path: str = str(SAMPLE_DATA / "train.jsonl")  # training records
    eval_data_path: str = str(SAMPLE_DATA / "eval.jsonl")  # held-out records; '' for none
    prompt_template: Literal["alpaca", "chat"] = "alpaca"  # chat: the tokenizer's chat template for every record
    train_on_prompt: bool = False  # also put loss on prompt tokens
    max_seq_len: int = 1024  # longer examples lose prompt tokens from the left first, then answer tokens
    truncation: Literal["keep_answer", "drop"] = "keep_answer"  # or drop examples that do not fit
    group_by_length: bool = True  # batch similar lengths together: less padding, faster
    pad_to_multiple: int = 64  # rows padded to a multiple of this: each new row length sets up its pipeline once
    # optimization
    epochs: float = 3.0  # passes over the training data (ignored when max_steps > 0)
    max_steps: int = 0  # optimizer steps; > 0 overrides epochs
    batch_size: int = 4  # examples per micro-batch per data-parallel rank
    grad_accum: int = 4  # micro-batches per optimizer step: the pipeline's chunks (1f1b: at least pp)
    lr: float = 2e-5  # peak lr; full fine-tuning of 7B-65B takes 1e-5 to 2e-5
    weight_decay: float = 0.0  # AdamW decay (not on norms and biases)
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW beta1,beta2
    warmup_ratio: float = 0.03  # fraction of steps with linear warmup, then cosine decay to 10%
    max_grad_norm: float = 1.0  # clipping by the norm of the whole model's gradient (all stages)
    seed: int = 42  # seeds data order
    # output, logging, checkpoints
    output_dir: str = "./out"  # everything this run writes
    log_every: int = 1  # steps between step-log lines
    eval_every: int = 0  # steps between evals; 0: only before training and at the end
    save_every: int = 0  # steps between checkpoints for --resume; 0: none
    keep_last: int = 2  # checkpoints kept
    resume: bool = False  # continue from the latest checkpoint in output_dir (same --pp and process count)
    overwrite: bool = False  # replace an earlier, different run in output_dir (else refused)
    on_nan: Literal["stop", "skip"] = "stop"  # a nan/inf loss or gradient: stop before updating, or skip the step
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb, mlflow or none
    inspect_data: bool = False  # data only: lengths, truncation, trained tokens, bad records; exit, no weights loaded


def build_examples(cfg: Config, tokenizer, path: str):
    """One data file read, rendered, tokenized, masked and truncated: (examples, stats)."""
    return build_sft_examples(read_records(path), tokenizer, cfg.max_seq_len, cfg.prompt_template,
                              cfg.train_on_prompt, cfg.truncation)


def scaled_loss(loss_sum, labels, scale: float):
    """The pipeline schedule's loss on the last stage: a micro-batch's summed loss times the step's scale."""
    return loss_sum * scale


def step_rows(examples, batches: list[list[int]], batch_size: int, n_batches: int) -> list[dict]:
    """The rows of n_batches micro-batches of batch_size (the pipeline splits one tensor into equal chunks): a short
    batch, or a missing one in an eval's last round, is filled with copies of an example that train nothing."""
    rows = []
    for b in range(n_batches):
        batch = [examples[i] for i in batches[b]] if b < len(batches) else []
        fill = batch[0] if batch else examples[0]
        rows += batch + [{**fill, "labels": [IGNORE_INDEX] * len(fill["labels"])}] * (batch_size - len(batch))
    return rows


def trained_tokens(example: dict) -> int:
    """The tokens an example puts loss on (its labels but the first, which nothing predicts)."""
    return sum(label != IGNORE_INDEX for label in example["labels"][1:])


@dataclass
class Layout:
    """Where this process sits: ranks form a (pp, dp, tp) grid, the tp ranks of a replica neighbours, then its dp
    ranks (one node's fast links carry the per-layer tensor-parallel collectives and FSDP's all-gathers; from stage to
    stage only activations travel)."""
    mesh: object  # DeviceMesh with dims ("pp", "dp", "tp")
    pp: int
    dp: int
    tp: int
    stage: int  # this process's stage
    dp_rank: int  # its place among the stage's data-parallel replicas
    tp_rank: int  # its place among the replica's tensor-parallel ranks

    @property
    def first(self) -> bool:
        """Stage 0: embeds the tokens."""
        return self.stage == 0

    @property
    def last(self) -> bool:
        """Stage pp - 1: the LM head and the loss."""
        return self.stage == self.pp - 1

    @property
    def counts_loss(self) -> bool:
        """The last stage's tp ranks all compute the same loss: one of them counts it."""
        return self.last and self.tp_rank == 0


def run_pipeline(pipelines: dict, stage_model, rows: list[dict], scale: float, training: bool, cfg: Config,
                 layout: Layout, pad_id: int, device: torch.device) -> float:
    """rows through the stages as grad_accum equal micro-batches (a training step, or an eval forward): the sum of
    the micro-batches' scaled losses on the last stage, 0 on the others. pipelines caches one stage + schedule per
    row length and mode: the schedule sizes its send and receive buffers on first use."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    # one row length for every dp rank: setting up a pipeline for a new length runs a forward, whose FSDP
    # all-gathers every dp rank of the stage must join
    longest = torch.tensor([max(len(e["input_ids"]) for e in rows)], device=device)
    dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=layout.mesh["dp"].get_group())
    width = math.ceil(int(longest) / cfg.pad_to_multiple) * cfg.pad_to_multiple
    batch = collate_left_padded(rows, pad_id, pad_to_multiple_of=width)  # every row exactly width long
    key = (width, training)
    if key not in pipelines:
        stage = PipelineStage(stage_model, layout.stage, layout.pp, device, group=layout.mesh["pp"].get_group())
        schedule_class = Schedule1F1B if cfg.schedule == "1f1b" else ScheduleGPipe
        pipelines[key] = schedule_class(stage, n_microbatches=cfg.grad_accum, loss_fn=scaled_loss, scale_grads=False)
    schedule = pipelines[key]
    batch = {k: v.to(device) for k, v in batch.items()}
    inputs = (batch["input_ids"],) if layout.first else ()  # the first stage embeds the tokens
    tensors = {"attention_mask": batch["attention_mask"], "position_ids": batch["position_ids"]}  # every stage
    if layout.last:
        tensors["labels"] = batch["labels"]
    losses = []
    run = schedule.step if training else schedule.eval
    run(*inputs, target=batch["labels"] if layout.last else None, losses=losses, loss_kwargs={"scale": scale},
        return_outputs=False, **tensors)
    return float(sum(loss.detach().double() for loss in losses)) if layout.counts_loss else 0.0


def evaluate(pipelines: dict, stage_model, eval_examples: list[dict], cfg: Config, layout: Layout, pad_id: int,
             rt) -> float:
    """Mean loss per trained token over the eval set: its batches split over the dp ranks, grad_accum at a time (a
    short last round filled with rows that count nothing: every dp rank must run as many forwards)."""
    stage_model.eval()
    all_eval = plan_batches([len(e["input_ids"]) for e in eval_examples], cfg.batch_size, 0, 0, True)
    mine = all_eval[layout.dp_rank::layout.dp]
    rounds = math.ceil(len(all_eval) / (layout.dp * cfg.grad_accum))
    loss_sum = n_tokens = 0.0
    with torch.no_grad():
        for r in range(rounds):
            group = mine[r * cfg.grad_accum:(r + 1) * cfg.grad_accum]
            rows = step_rows(eval_examples, group, cfg.batch_size, cfg.grad_accum)
            loss_sum += run_pipeline(pipelines, stage_model, rows, 1.0, False, cfg, layout, pad_id, rt.device)
            n_tokens += sum(trained_tokens(e) for e in rows) if layout.counts_loss else 0
    stage_model.train()
    loss_sum, n_tokens = all_reduce_sum([loss_sum, n_tokens], rt)  # only the last stages' first tp ranks counted
    return loss_sum / max(n_tokens, 1)


def log_startup(log, cfg: Config, model_dir, layout: Layout, bounds, stage_model, skeleton, attn, precision,
                checkpointing, data_lines, batches_per_epoch, total_steps, warmup_steps, rt):
    """The start-up block: model, pipeline layout with each stage's size, data, batches and steps."""
    stage_sizes = [0] * rt.world_size
    dist.all_gather_object(stage_sizes, sum(p.numel() for p in stage_model.parameters()))  # DTensors: full size
    ranks_per_stage = layout.dp * layout.tp
    split = ", ".join(f"{b - a} layers ({stage_sizes[s * ranks_per_stage] / 1e6:,.1f}M)"
                      for s, (a, b) in enumerate(bounds))
    n_params = sum(p.numel() for p in skeleton.parameters())
    log.info(f"model    {cfg.model_path} ({model_dir}) | full fine-tune, {n_params:,} params | {attn} attention, "
             f"{precision.reason} | activation checkpointing {'on' if checkpointing else 'off'}")
    log.info(f"pipeline {layout.pp} stage(s) x {layout.dp} data-parallel (FSDP2) x {layout.tp} tensor-parallel = "
             f"{rt.world_size} process(es), "
             f"{cfg.schedule} schedule, {cfg.grad_accum} micro-batches/step | stages: {split}")
    for line in data_lines:
        log.info(line)
    rows_per_step = cfg.batch_size * cfg.grad_accum * layout.dp
    log.info(f"batches  {batches_per_epoch} per epoch per dp rank | batch {cfg.batch_size} x accum {cfg.grad_accum} x "
             f"{layout.dp} dp = {rows_per_step} examples/step | rows padded to a multiple of {cfg.pad_to_multiple}")
    log.info(f"steps    {total_steps} ({total_steps * cfg.grad_accum / batches_per_epoch:.2f} epochs), lr {cfg.lr:g} "
             f"warmup {warmup_steps} | AdamW | device {rt.describe()}")


def main(cfg: Config) -> dict:
    # ---- setup: one process group even for one process (FSDP2 needs a device mesh), seed, device, threads
    from torch.distributed.device_mesh import init_device_mesh

    if len(cfg.adam_betas) != 2:
        raise UserError(f"--adam_betas: expected two numbers beta1,beta2, got {cfg.adam_betas}")
    if cfg.batch_size < 1 or cfg.grad_accum < 1 or cfg.pad_to_multiple < 1:
        raise UserError(f"--batch_size={cfg.batch_size} --grad_accum={cfg.grad_accum} "
                        f"--pad_to_multiple={cfg.pad_to_multiple}: expected 1 or more each")
    quiet_third_party_logs()
    set_single_process_env()
    rt = setup_runtime(cfg.seed)
    if cfg.pp < 1 or cfg.tp < 1 or rt.world_size % (cfg.pp * cfg.tp):
        raise UserError(f"--pp={cfg.pp} --tp={cfg.tp}: expected 1 or more each, and the {rt.world_size} "
                        "process(es) must be a whole multiple of pp x tp (processes = pp x dp x tp)")
    if cfg.pad_to_multiple % cfg.tp:
        raise UserError(f"--pad_to_multiple={cfg.pad_to_multiple}: must be a multiple of --tp={cfg.tp} (each tp rank "
                        "holds an equal part of every row)")
    if cfg.schedule == "1f1b" and cfg.grad_accum < cfg.pp:
        raise UserError(f"--grad_accum={cfg.grad_accum}: 1F1B needs at least as many micro-batches as stages "
                        f"(--pp={cfg.pp}); more (4 x pp) keep the pipeline busier")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if rt.device.type == "cuda" else "gloo")
    dp = rt.world_size // (cfg.pp * cfg.tp)
    mesh = init_device_mesh(rt.device.type, (cfg.pp, dp, cfg.tp), mesh_dim_names=("pp", "dp", "tp"))
    ranks = [mesh.get_local_rank(dim) for dim in ("pp", "dp", "tp")]  # this process's stage, replica, tp rank
    layout = Layout(mesh, cfg.pp, dp, cfg.tp, *ranks)
    out = Path(cfg.output_dir)

    # ---- tokenizer and data: every stage of a data-parallel rank reads the same batches (the first stage feeds
    # the tokens, every stage takes the masks and positions, the last the labels)
    model_dir = resolve_model_path(cfg.model_path)
    tokenizer = load_tokenizer(model_dir)
    pad_id = tokenizer.pad_token_id
    examples, train_stats = build_examples(cfg, tokenizer, cfg.data_path)
    eval_examples, eval_stats = build_examples(cfg, tokenizer, cfg.eval_data_path) if cfg.eval_data_path else ([], None)
    data_lines = sft_data_report(tokenizer, cfg.data_path, examples, train_stats, cfg.eval_data_path, eval_stats,
                                 None, cfg.max_seq_len)
    if cfg.inspect_data:  # a data-only run: nothing written, no model weights read
        if rt.is_main:
            print("\n".join(data_lines), flush=True)
        cleanup(rt)
        return {"inspect_data": True, "train_stats": train_stats, "eval_stats": eval_stats}
    lengths = [len(e["input_ids"]) for e in examples]

    def plan(epoch):  # this data-parallel rank's batches of one epoch
        return plan_batches(lengths, cfg.batch_size, cfg.seed, epoch, cfg.group_by_length, layout.dp_rank, dp)

    batches_per_epoch = len(plan(0))
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum)
    prepare_output_dir(cfg, out, rt.is_main)  # refuses to mix this run into an earlier, different one
    log = StepLogger(out, total_steps, cfg.report_to, enabled=rt.is_main, config=config_to_dict(cfg))
    precision = training_precision(rt.device, "none")  # bf16 compute on GPUs from compute capability 8.0, else fp32
    dtype = precision.dtype

    # ---- model: this process's stage only, built on the meta device, then its own tensors read from the
    # checkpoint's safetensors and sharded over the stage's dp ranks (FSDP2: fp32 masters, compute in dtype)
    attn = resolve_attention(cfg.attn_implementation, rt.device)
    checkpointing = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else rt.device.type == "cuda"
    stage_model, skeleton, bounds = build_pipeline_stage(model_dir, cfg.pp, layout.stage, mesh["dp"], dtype,
                                                         rt.device, attn, checkpointing, cfg.stage_layers, mesh["tp"])

    # ---- optimizer (AdamW over the sharded fp32 parameters, fused on GPU) and schedule
    optimizer = torch.optim.AdamW(weight_decay_groups(stage_model, cfg.weight_decay), lr=cfg.lr,
                                  betas=tuple(cfg.adam_betas), fused=rt.device.type == "cuda")
    warmup_steps = int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup_steps))
    start_step = 0
    if cfg.resume:
        ckpt = resume_checkpoint(out)  # rank 0's latest, on every rank
        if ckpt is None:
            log.info(f"--resume: no checkpoint in {out / 'checkpoints'}, starting from step 0")
        else:
            start_step = load_dcp_checkpoint(ckpt, stage_model, optimizer, scheduler)  # weights, optimizer, RNG
            log.info(f"resumed from {ckpt} at step {start_step}")
    log_startup(log, cfg, model_dir, layout, bounds, stage_model, skeleton, attn, precision, checkpointing,
                data_lines, batches_per_epoch, total_steps, warmup_steps, rt)
    pipelines = {}  # one stage + schedule per row length and mode, made on first use

    def evaluate_now() -> float:
        return evaluate(pipelines, stage_model, eval_examples, cfg, layout, pad_id, rt)

    # ---- training loop (its nan guard, step log and checkpoint / SIGTERM block are the other recipes' own lines,
    # repeated on purpose: this folder is read and copied on its own)
    stream = batch_stream(plan, start_batch=start_step * cfg.grad_accum)  # resume: past what was trained on
    if eval_examples and start_step == 0:
        log.log(0, {"eval_loss": evaluate_now()})
    stage_model.train()
    train_seconds, tokens_seen, losses = 0.0, 0, []
    stop, preempted, path = catch_stop_signals(), False, None  # SIGTERM / Ctrl-C: checkpoint, then exit
    for step in range(start_step + 1, total_steps + 1):
        t0 = time.perf_counter()
        step_batches = [next(stream) for _ in range(cfg.grad_accum)]
        rows = step_rows(examples, step_batches, cfg.batch_size, cfg.grad_accum)
        # normalise by the trained tokens of the whole step on all dp ranks: every token weighs the same
        n_trained = sum(trained_tokens(e) for e in rows)
        n_tokens = sum(lengths[i] for idx in step_batches for i in idx)
        n_trained, n_tokens = all_reduce_sum([n_trained, n_tokens], rt, group=mesh["dp"].get_group())
        # each micro-batch's loss sum / the step's trained tokens on all dp ranks; x dp undoes FSDP's mean over them
        scale = dp / max(n_trained, 1)
        share = run_pipeline(pipelines, stage_model, rows, scale, True, cfg, layout, pad_id, rt.device) / dp
        grad_norm = clip_grad_norm_across_stages(stage_model, cfg.max_grad_norm, mesh["pp"].get_group())
        (loss,) = all_reduce_sum([share], rt)  # only the last stages hold a loss: the step's mean
        if not is_finite(loss, grad_norm):  # the same on every rank (summed loss, global norm): all stop or skip
            if cfg.on_nan == "stop":
                raise non_finite_error(step, loss, grad_norm, out)  # before any update: weights stay as they were
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            log.info(f"step {step}/{total_steps}: loss {loss}, gradient norm {float(grad_norm)}: "
                     "skipped (--on_nan=skip)")
            continue
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        train_seconds += dt
        tokens_seen += int(n_tokens)
        losses.append(loss)
        log.advance()
        if step % cfg.log_every == 0 or step == total_steps:
            log.log(step, {"loss": loss, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                           "tokens_per_s": n_tokens / dt, **memory_gb(rt.device)})
        if eval_examples and cfg.eval_every > 0 and step % cfg.eval_every == 0 and step != total_steps:
            log.log(step, {"eval_loss": evaluate_now()})
        preempted = stop_requested(stop, rt)
        if cfg.save_every > 0 and step % cfg.save_every == 0 or preempted:  # every rank writes its shards
            path = save_dcp_checkpoint(out, step, cfg.keep_last, stage_model, optimizer, scheduler)
            log.info(f"saved checkpoint {path}")
        if preempted:
            log.info(f"stopped by {stop.signal or 'a signal to another rank'} after step {step}: checkpoint "
                     f"{path or latest_checkpoint(out)}; continue with --resume")
            break

    stop.restore()
    if preempted:
        log.close()
        cleanup(rt)
        return {"preempted": True, "losses": losses, "steps": step - start_step}

    # ---- save: one consolidated Hugging Face checkpoint, then the final eval
    writer = layout.dp_rank == 0 and layout.tp_rank == 0  # one rank of each stage writes its shard
    final_dir = save_pipeline_final(out / "final", stage_model, skeleton, tokenizer, dtype, layout.stage, cfg.pp,
                                    writer)
    eval_loss = None
    if eval_examples:
        eval_loss = evaluate_now()
        log.log(total_steps, {"eval_loss": eval_loss})
    log.info(f"done: {total_steps - start_step} steps in {train_seconds:.1f}s, "
             f"{tokens_seen / max(train_seconds, 1e-9):,.0f} tok/s, peak mem {peak_memory_gb(rt.device):.2f} GB")
    log.info(f"model and tokenizer in {final_dir}; metrics in {out / 'metrics.jsonl'}, curve in {out / 'loss.png'}")
    log.info(f"use it: AutoModelForCausalLM.from_pretrained('{final_dir}')")
    log.close()
    cleanup(rt)
    return {"stage_model": stage_model, "tokenizer": tokenizer, "losses": losses, "eval_loss": eval_loss,
            "final_dir": final_dir, "train_seconds": train_seconds, "tokens": tokens_seen,
            "steps": total_steps - start_step}


if __name__ == "__main__":
    with exit_on_user_error():
        main(parse_config(Config))
