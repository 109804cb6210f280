"""Full-parameter supervised fine-tuning of a Llama-family model under DeepSpeed ZeRO: every weight trains, the
fp32 master weights and Adam states live in CPU RAM and are stepped there (DeepSpeedCPUAdam), so one GPU holds only
the bf16 weights, gradients and activations. ZeRO-3 (optionally with the weights offloaded too) for large models.

Default run, no GPU, no download (tiny random-init Llama, bundled English/Chinese sample data), about a minute:
    cd sft/full-ft-deepspeed-offload && bash run.sh
One GPU, a real checkpoint (ZeRO-2, optimizer on CPU, bf16, activation checkpointing):
    bash run.sh --model_path=/models/Llama-2-7b-hf --data_path=train.jsonl --eval_data_path=eval.jsonl
N GPUs: NGPU=N bash run.sh ...   Several nodes: HOSTFILE=hostfile bash run.sh ...   Large models: --zero_stage=3
Data (.jsonl, .json, .jsonl.zst): alpaca {"instruction","input","output"}, {"input","target"} or chat {"messages"}.
Writes output_dir/: final/ (config.json + model.safetensors + tokenizer), config.json, metrics.jsonl, loss.png,
tensorboard/, checkpoints/ (DeepSpeed's, with zero_to_fp32.py). The first run JIT-compiles DeepSpeedCPUAdam
with gcc (60-90 s, cached in TORCH_EXTENSIONS_DIR). Host RAM for the offloaded optimizer: 12-16 bytes/parameter.
"""
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from common.checkpoint import atomic_write_dir, latest_checkpoint, prepare_output_dir, resume_checkpoint
from common.config import UserError, config_to_dict, exit_on_user_error, parse_config
from common.data import (
    batch_stream,
    build_sft_examples,
    collate_left_padded,
    collate_packed,
    pack_examples,
    padding_efficiency,
    plan_batches,
    read_records,
    sft_data_report,
)
from common.deepspeed_utils import (
    build_cpu_adam,
    fill_ds_config,
    gather_full_state_dict,
    init_distributed,
    load_deepspeed_checkpoint,
    quiet_deepspeed_warnings,
    read_ds_config,
    save_deepspeed_checkpoint,
)
from common.inference import save_generation_config
from common.logs import StepLogger, memory_gb, peak_memory_gb, quiet_third_party_logs
from common.losses import count_trained_tokens, is_finite, loss_window, non_finite_error, token_loss_sum
from common.model import load_model, load_tokenizer, resolve_model_path
from common.optim import warmup_cosine, weight_decay_groups
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
    # model
    model_path: str = "tiny"  # 'tiny' (random-init test Llama) or a local Hugging Face model folder
    gradient_checkpointing: bool | None = None  # recompute activations in backward (less memory); None: on with a GPU
    # DeepSpeed ZeRO
    zero_stage: Literal[2, 3] = 2  # 2: gradients and optimizer states partitioned; 3: the weights too (large models)
    offload_optimizer: bool = True  # fp32 master weights + Adam states in CPU RAM, stepped by DeepSpeedCPUAdam
    offload_params: bool = False  # stage 3 only: the weights wait in CPU RAM too and are fetched layer by layer
    ds_config: str = str(Path(__file__).resolve().with_name("ds_config.json"))  # DeepSpeed's own knobs (buckets...)
    # data
    data_path: str = str(SAMPLE_DATA / "train.jsonl")  # training records
    eval_data_path: str = str(SAMPLE_DATA / "eval.jsonl")  # held-out records; '' for none
    prompt_template: Literal["alpaca", "chat"] = "alpaca"  # chat: the tokenizer's chat template for every record
    train_on_prompt: bool = False  # also put loss on prompt tokens
    max_seq_len: int = 1024  # longer examples lose prompt tokens from the left first, then answer tokens
    truncation: Literal["keep_answer", "drop"] = "keep_answer"  # or drop examples that do not fit
    group_by_length: bool = True  # batch similar lengths together: less padding, faster
    packing: bool = False  # concatenate examples into rows of max_seq_len, kept apart by masks (best with FA2 on GPU)
    # optimization
    epochs: float = 3.0  # passes over the training data (ignored when max_steps > 0)
    max_steps: int = 0  # optimizer steps; > 0 overrides epochs
    batch_size: int = 4  # examples per micro-batch per GPU
    grad_accum: int = 4  # micro-batches per optimizer step
    # Adam moves every weight by about lr per step whatever its gradient scale, so the real-model rate also moves the
    # random-init tiny model: the default CPU run's eval loss falls by about 1.5 nats (README, measured)
    lr: float = 2e-5  # peak lr; full fine-tuning of 7B-13B takes 1e-5 to 2e-5 (LoRA rates like 2e-4 diverge)
    weight_decay: float = 0.0  # AdamW decay (not on norms and biases)
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW beta1,beta2
    warmup_ratio: float = 0.03  # fraction of steps with linear warmup, then cosine decay to 10%
    max_grad_norm: float = 1.0  # gradient clipping (done by DeepSpeed on the whole, partitioned gradient)
    seed: int = 42  # seeds data order and dropout
    # output, logging, checkpoints
    output_dir: str = "./out"  # everything this run writes
    log_every: int = 1  # steps between step-log lines
    eval_every: int = 0  # steps between evals; 0: only before training and at the end
    save_every: int = 0  # steps between checkpoints for --resume; 0: none
    keep_last: int = 2  # checkpoints kept
    resume: bool = False  # continue from the latest checkpoint in output_dir
    overwrite: bool = False  # replace an earlier, different run in output_dir (else refused)
    on_nan: Literal["stop", "skip"] = "stop"  # a nan/inf loss or gradient: stop before updating, or skip the step
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb, mlflow or none
    inspect_data: bool = False  # data only: lengths, truncation, trained tokens, bad records; exit, no weights loaded


# build_examples, evaluate and save_final are this recipe's own copies (the other sft recipes have near-identical
# ones): short, and kept here on purpose so this folder can be copied and edited on its own.
def build_examples(cfg: Config, tokenizer, path: str):
    """One data file read, rendered, tokenized, masked and truncated: (examples, stats)."""
    records = read_records(path)
    return build_sft_examples(records, tokenizer, cfg.max_seq_len, cfg.prompt_template, cfg.train_on_prompt,
                              cfg.truncation)


def evaluate(engine, batches, examples, pad_id, rt) -> float:
    """Mean loss per trained token over the eval batches of all ranks; batches: [(example indices, counted)]."""
    engine.eval()
    loss_sum, n_tokens = 0.0, 0
    with torch.no_grad():
        for idx, counted in batches:
            batch = collate_left_padded([examples[i] for i in idx], pad_id)
            window = loss_window(batch["labels"])  # window and counts from the CPU labels: no wait for the GPU
            n_trained = count_trained_tokens(batch["labels"])
            batch = {k: v.to(rt.device) for k, v in batch.items()}
            labels = batch.pop("labels")
            logits = engine(**batch, use_cache=False, logits_to_keep=window).logits
            loss = token_loss_sum(logits, labels)
            if counted:  # on the device, read once below
                loss_sum, n_tokens = loss_sum + loss.double(), n_tokens + n_trained
    engine.train()
    loss_sum = float(loss_sum)
    loss_sum, n_tokens = all_reduce_sum([loss_sum, n_tokens], rt)
    return loss_sum / max(n_tokens, 1)


def eval_plan(eval_examples, cfg: Config, rt) -> list[tuple[list[int], bool]]:
    """This rank's eval batches as [(example indices, counted)]. Under ZeRO-3 every forward gathers weights from all
    ranks, so all ranks run as many forwards: a rank short of a batch runs the first one again without counting it."""
    if not eval_examples:
        return []
    all_eval = plan_batches([len(e["input_ids"]) for e in eval_examples], cfg.batch_size, 0, 0, True)
    eval_batches = [(idx, True) for idx in all_eval[rt.rank::rt.world_size]]
    rounds = math.ceil(len(all_eval) / rt.world_size)
    return eval_batches + [(all_eval[0], False)] * (rounds - len(eval_batches))


def deepspeed_config(cfg: Config, dtype, world_size: int) -> dict:
    """ds_config.json holds DeepSpeed's own knobs; every value below comes from Config and wins (a JSON value that
    disagrees is an error, "auto" is filled in)."""
    offload_optimizer = "cpu" if cfg.offload_optimizer else "none"
    offload_params = "cpu" if cfg.offload_params else "none"
    owned = {
        "train_micro_batch_size_per_gpu": (cfg.batch_size, "--batch_size"),
        "gradient_accumulation_steps": (cfg.grad_accum, "--grad_accum"),
        "train_batch_size": (cfg.batch_size * cfg.grad_accum * world_size, "--batch_size x --grad_accum x ranks"),
        "gradient_clipping": (cfg.max_grad_norm, "--max_grad_norm"),
        "bf16.enabled": (dtype == torch.bfloat16, "the device (bf16 from compute capability 8.0)"),
        "fp16.enabled": (dtype == torch.float16, "the device (fp16 below compute capability 8.0)"),
        "zero_optimization.stage": (cfg.zero_stage, "--zero_stage"),
        "zero_optimization.offload_optimizer.device": (offload_optimizer, "--offload_optimizer"),
        "zero_optimization.offload_param.device": (offload_params, "--offload_params"),
        "optimizer": (None, "--lr, --adam_betas, --weight_decay"),
        "scheduler": (None, "--warmup_ratio (warmup then cosine, a LambdaLR)"),
    }
    return fill_ds_config(read_ds_config(cfg.ds_config), owned, cfg.ds_config)


def make_ds_optimizer(model, cfg: Config, device):
    """AdamW given to DeepSpeed ready-made. Offloaded, the step runs on CPU in DeepSpeedCPUAdam (DeepSpeed refuses
    another optimizer there); on the GPU, torch's fused AdamW."""
    groups = weight_decay_groups(model, cfg.weight_decay)
    betas = tuple(cfg.adam_betas)
    if cfg.offload_optimizer:
        return build_cpu_adam(groups, cfg.lr, betas)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, fused=device.type == "cuda")


def resume(engine, out: Path, log) -> int:
    """--resume: weights, optimizer, schedule and RNG of the latest checkpoint; returns its step (0: none)."""
    ckpt = resume_checkpoint(out)  # rank 0's latest, on every rank
    if ckpt is None:
        log.info(f"--resume: no checkpoint in {out / 'checkpoints'}, starting from step 0")
        return 0
    start_step = load_deepspeed_checkpoint(engine, ckpt)  # weights, optimizer, scheduler, RNG
    log.info(f"resumed from {ckpt} at step {start_step}")
    return start_step


def log_startup(log, cfg: Config, model_dir, n_params, optimizer, precision, checkpointing, data_lines, plan,
                lengths, total_steps, rt):
    """The start-up block: model, ZeRO, data (with one rendered example), batches and steps."""
    offloaded = {(True, True): "optimizer and weights", (True, False): "optimizer", (False, True): "weights",
                 (False, False): "nothing"}[(cfg.offload_optimizer, cfg.offload_params)]
    log.info(f"model    {cfg.model_path} ({model_dir}) | full fine-tune, {n_params:,} params, all trainable | "
             f"{precision.reason} | activation checkpointing {'on' if checkpointing else 'off'}")
    log.info(f"zero     stage {cfg.zero_stage}, {offloaded} offloaded to CPU | {type(optimizer).__name__} | "
             f"config {cfg.ds_config}")
    for line in data_lines:
        log.info(line)
    batches_per_epoch = len(plan(0))
    rows_per_step = cfg.batch_size * cfg.grad_accum * rt.world_size
    row_kind = "packed rows" if cfg.packing else "examples"
    log.info(f"batches  {batches_per_epoch} per epoch per rank | batch {cfg.batch_size} x accum {cfg.grad_accum} x "
             f"{rt.world_size} ranks = {rows_per_step} {row_kind}/step | "
             f"padding efficiency {padding_efficiency(plan(0), lengths):.3f}")
    log.info(f"steps    {total_steps} ({total_steps * cfg.grad_accum / batches_per_epoch:.2f} epochs), lr {cfg.lr:g} "
             f"warmup {int(cfg.warmup_ratio * total_steps)} | device {rt.describe()}")


def save_final(engine, model, tokenizer, final_dir: Path, rt):
    """One Hugging Face checkpoint in final/, gathered from the partitions (every rank takes part), written by rank 0
    with the tokenizer and generation_config.json."""
    state_dict = gather_full_state_dict(engine)

    def write(d):
        model.save_pretrained(d, state_dict=state_dict)
        tokenizer.save_pretrained(d)
        save_generation_config(d, model, tokenizer)

    if rt.is_main:
        atomic_write_dir(final_dir, write)


def main(cfg: Config) -> dict:
    # ---- setup: one process group even for one process (DeepSpeed needs it), then seed, device, threads
    if cfg.offload_params and cfg.zero_stage != 3:
        raise UserError("--offload_params needs --zero_stage=3 (ZeRO-2 keeps the full weights on every GPU)")
    if len(cfg.adam_betas) != 2:
        raise UserError(f"--adam_betas: expected two numbers beta1,beta2, got {cfg.adam_betas}")
    quiet_third_party_logs()
    quiet_deepspeed_warnings()
    set_single_process_env()
    rt = setup_runtime(cfg.seed)
    out = Path(cfg.output_dir)

    # ---- tokenizer and data
    model_dir = resolve_model_path(cfg.model_path)
    tokenizer = load_tokenizer(model_dir)
    examples, train_stats = build_examples(cfg, tokenizer, cfg.data_path)
    eval_examples, eval_stats = build_examples(cfg, tokenizer, cfg.eval_data_path) if cfg.eval_data_path else ([], None)
    # each packed row holds several examples; position ids and a block mask keep them independent
    train_examples = pack_examples(examples, cfg.max_seq_len) if cfg.packing else examples
    data_lines = sft_data_report(tokenizer, cfg.data_path, examples, train_stats, cfg.eval_data_path, eval_stats,
                                 train_examples if cfg.packing else None, cfg.max_seq_len)
    if cfg.inspect_data:  # a data-only run: nothing written, no model weights read, DeepSpeed not started
        if rt.is_main:
            print("\n".join(data_lines), flush=True)
        cleanup(rt)
        return {"inspect_data": True, "train_stats": train_stats, "eval_stats": eval_stats}
    import deepspeed

    init_distributed()  # gloo on CPU, nccl on GPUs; joins the group setup_runtime made, if any
    lengths = [len(e["input_ids"]) for e in train_examples]

    def plan(epoch):  # this rank's batches of one epoch
        return plan_batches(lengths, cfg.batch_size, cfg.seed, epoch, cfg.group_by_length, rt.rank, rt.world_size)

    batches_per_epoch = len(plan(0))
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum)
    eval_batches = eval_plan(eval_examples, cfg, rt)
    prepare_output_dir(cfg, out, rt.is_main)  # refuses to mix this run into an earlier, different one
    log = StepLogger(out, total_steps, cfg.report_to, enabled=rt.is_main, config=config_to_dict(cfg))
    precision = training_precision(rt.device, "deepspeed")  # bf16; fp16 below compute capability 8.0
    dtype = precision.dtype
    loss_scaled = dtype == torch.float16  # DeepSpeed's dynamic loss scaling drops the steps that overflow in fp16
    ds_config = deepspeed_config(cfg, dtype, rt.world_size)

    # ---- model: all weights train. Under ZeRO-3, HfDeepSpeedConfig makes from_pretrained build the model inside
    # deepspeed.zero.Init, so each rank only ever holds its partition (a 65B never sits whole in one process);
    # the object must stay alive while transformers uses it, hence the variable.
    hf_zero3 = None
    if cfg.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_zero3 = HfDeepSpeedConfig(ds_config)  # noqa: F841
    model = load_model(model_dir, "none", dtype)
    model.config.pad_token_id = tokenizer.pad_token_id
    checkpointing = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else rt.device.type == "cuda"
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ds_numel: the unpartitioned size

    # ---- optimizer and schedule, given to DeepSpeed ready-made
    optimizer = make_ds_optimizer(model, cfg, rt.device)
    warmup_steps = int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup_steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    start_step = resume(engine, out, log) if cfg.resume else 0
    log_startup(log, cfg, model_dir, n_params, optimizer, precision, checkpointing, data_lines, plan, lengths,
                total_steps, rt)

    # ---- training loop
    stream = batch_stream(plan, start_batch=start_step * cfg.grad_accum)  # resume: past what was trained on
    pad_id, attn = tokenizer.pad_token_id, model.config._attn_implementation

    def collate(rows):
        return collate_packed(rows, pad_id, attn) if cfg.packing else collate_left_padded(rows, pad_id)

    if eval_examples and start_step == 0:
        log.log(0, {"eval_loss": evaluate(engine, eval_batches, eval_examples, pad_id, rt)})
    engine.train()
    train_seconds, tokens_seen, tokens_computed, losses = 0.0, 0, 0, []
    stop, preempted, path = catch_stop_signals(), False, None  # SIGTERM / Ctrl-C: checkpoint, then exit
    for step in range(start_step + 1, total_steps + 1):
        t0 = time.perf_counter()
        chunk_idx = [next(stream) for _ in range(cfg.grad_accum)]
        chunk = [collate([train_examples[i] for i in idx]) for idx in chunk_idx]
        # normalise by the trained tokens of the whole step on all ranks: every token weighs the same
        n_trained = sum(count_trained_tokens(b["labels"]) for b in chunk)
        n_tokens = sum(lengths[i] for idx in chunk_idx for i in idx)
        n_computed = sum(b["input_ids"].numel() for b in chunk)
        n_trained, n_tokens, n_computed = all_reduce_sum([n_trained, n_tokens, n_computed], rt)
        loss_sum = 0.0
        for i, batch in enumerate(chunk):
            window = loss_window(batch["labels"])  # from the CPU labels: no wait for the GPU
            batch = {k: v.to(rt.device) for k, v in batch.items()}
            labels = batch.pop("labels")
            # logits only where a trained token is predicted (the answers), not over the prompts
            logits = engine(**batch, use_cache=False, logits_to_keep=window).logits
            micro_loss = token_loss_sum(logits, labels)
            loss_sum += micro_loss.detach().double()  # stays on the device: no wait per micro-batch
            if i == len(chunk) - 1:  # engine.step() updates at this one: read the step's losses once, before it
                # summed over the ranks first: a nan on any rank stops every rank, none is left waiting in backward
                (loss_sum,) = all_reduce_sum([float(loss_sum)], rt)
                loss = loss_sum / max(n_trained, 1)
                if not is_finite(loss, None, loss_scaled) and cfg.on_nan == "stop":  # the gradient norm comes later
                    raise non_finite_error(step, loss, None, out)
            # The loss is already a share of the step's mean, so undo both of DeepSpeed's own divisions:
            # scale_wrt_gas=False stops backward() dividing by grad_accum, and the gradient reduction averages over
            # ranks, so multiplying by world_size makes it the sum over all ranks' tokens.
            engine.backward(micro_loss * rt.world_size / max(n_trained, 1), scale_wrt_gas=False)
            engine.step()  # steps optimizer and schedule (and clips) only after the grad_accum-th micro-batch
        # the norm of the whole step's gradient, before clipping; a non-finite one (a nan loss gives one) makes
        # DeepSpeed drop the update and the gradients itself (ZeRO's overflow check), and the norm reads inf
        grad_norm = engine.get_global_grad_norm()
        if not is_finite(loss, grad_norm, loss_scaled):
            if cfg.on_nan == "stop":
                raise non_finite_error(step, loss, grad_norm, out)
            scheduler.step()  # DeepSpeed skips the schedule with the update; the other recipes count the step
            log.info(f"step {step}/{total_steps}: loss {loss}, gradient norm {float(grad_norm)}: "
                     "skipped (--on_nan=skip)")
            continue
        dt = time.perf_counter() - t0
        train_seconds += dt
        tokens_seen += int(n_tokens)
        tokens_computed += int(n_computed)
        losses.append(loss)
        log.advance()
        if step % cfg.log_every == 0 or step == total_steps:
            log.log(step, {"loss": loss, "lr": scheduler.get_last_lr()[0],
                           "grad_norm": None if grad_norm is None else float(grad_norm),
                           "tokens_per_s": n_tokens / dt, **memory_gb(rt.device)})
        if eval_examples and cfg.eval_every > 0 and step % cfg.eval_every == 0 and step != total_steps:
            log.log(step, {"eval_loss": evaluate(engine, eval_batches, eval_examples, pad_id, rt)})
        preempted = stop_requested(stop, rt)
        if (cfg.save_every > 0 and step % cfg.save_every == 0 or preempted):  # every rank saves its partition
            path = save_deepspeed_checkpoint(engine, out, step, cfg.keep_last)
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

    # ---- save: one Hugging Face checkpoint, gathered from the partitions (every rank takes part), then final eval
    final_dir = out / "final"
    save_final(engine, model, tokenizer, final_dir, rt)
    eval_loss = None
    if eval_examples:
        eval_loss = evaluate(engine, eval_batches, eval_examples, pad_id, rt)
        log.log(total_steps, {"eval_loss": eval_loss})
    log.info(f"done: {total_steps - start_step} steps in {train_seconds:.1f}s, "
             f"{tokens_seen / max(train_seconds, 1e-9):,.0f} tok/s, peak mem {peak_memory_gb(rt.device):.2f} GB")
    log.info(f"model and tokenizer in {final_dir}; metrics in {out / 'metrics.jsonl'}, curve in {out / 'loss.png'}")
    log.info(f"use it: AutoModelForCausalLM.from_pretrained('{final_dir}')")
    log.close()
    cleanup(rt)
    # model: the trained Hugging Face model (under ZeRO-3 its weights stay partitioned; final_dir has them whole)
    return {"model": model, "tokenizer": tokenizer, "losses": losses, "eval_loss": eval_loss, "final_dir": final_dir,
            "train_seconds": train_seconds, "tokens": tokens_seen, "tokens_computed": tokens_computed,
            "steps": total_steps - start_step}


if __name__ == "__main__":
    with exit_on_user_error():
        main(parse_config(Config))
