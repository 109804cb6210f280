"""QLoRA supervised fine-tuning sharded with PyTorch FSDP2 (`fully_shard`) under torchrun: the frozen NF4 base and the
LoRA adapters are split over the GPUs, so a 65B model trains on two 24 GB cards with every GPU computing at once
(the layer split of sft/qlora's --device_map=auto fits the same model but keeps one GPU busy at a time).

Default run, no GPU, no download (tiny random-init Llama, bundled sample data, one CPU process), about 25 s;
NGPU=2 shards it over two gloo processes:
    cd sft/fsdp-qlora && bash run.sh
65B on two 24 GB GPUs:
    NGPU=2 bash run.sh --model_path=/models/llama-65b --data_path=train.jsonl --lora_r=8 --max_seq_len=512 \
        --batch_size=1 --grad_accum=16
    (or --cpu_offload=true with any rank: shards and optimizer in host RAM, about 50 GB of it; slower, GPUs nearly free)
The model is built on the meta device and each decoder layer is read, quantized to NF4 on its GPU and sharded before
the next (common/quant_load.py): host RAM holds one layer at a time, and no GPU ever holds the whole 4-bit model.
The packed 4-bit bytes are stored as the compute dtype (bf16 on GPU) so FSDP can shard and gather them untouched.
Writes output_dir/: final/ (adapter + tokenizer, the same files as sft/qlora), config.json, metrics.jsonl, loss.png,
checkpoints/ (torch.distributed.checkpoint: adapters and optimizer only, sharded).
"""
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from common.checkpoint import (
    atomic_write_dir,
    latest_checkpoint,
    load_sharded_trainer_state,
    prepare_output_dir,
    resume_checkpoint,
    save_sharded_checkpoint,
)
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
from common.inference import save_generation_config
from common.logs import StepLogger, memory_gb, peak_memory_gb, quiet_third_party_logs
from common.losses import count_trained_tokens, is_finite, loss_window, non_finite_error, token_loss_sum
from common.model import add_lora, load_tokenizer, prepare_for_lora_training, resolve_model_path
from common.optim import warmup_cosine, weight_decay_groups
from common.quant_load import build_4bit_model_on_meta, load_4bit_weights
from common.runtime import (
    all_reduce_sum,
    catch_stop_signals,
    cleanup,
    process_group_backend,
    set_single_process_env,
    setup_runtime,
    stop_requested,
    training_precision,
)

SAMPLE_DATA = Path(__file__).resolve().parents[2] / "data" / "sft"


@dataclass
class Config:
    # model
    model_path: str = "tiny"  # 'tiny' (random-init test Llama) or a local Hugging Face folder with *.safetensors
    gradient_checkpointing: bool | None = None  # recompute activations in backward (less memory); None: on with a GPU
    reshard_after_forward: bool = True  # free each layer's gathered weights after its forward (least memory)
    cpu_offload: bool = False  # shards, gradients and optimizer states in host RAM, the step on CPU (GPU runs only)
    lora_r: int = 64  # adapter rank (QLoRA paper: 64)
    lora_alpha: int = 16  # adapter scale is alpha / r
    lora_dropout: float = 0.0  # dropout on the adapter input (QLoRA paper: 0.05-0.1; masks cost ~30% of a CPU step)
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # or e.g. q_proj,v_proj
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
    lr: float = 2e-4  # peak learning rate
    weight_decay: float = 0.0  # AdamW decay (not on norms and biases)
    warmup_ratio: float = 0.03  # fraction of steps with linear warmup, then cosine decay to 10%
    max_grad_norm: float = 0.3  # gradient clipping (QLoRA paper: 0.3)
    seed: int = 42  # seeds LoRA init, dropout and data order
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


def evaluate(model, batches, examples, pad_id, rt) -> float:
    """Mean loss per trained token over the eval batches of all ranks; batches: [(example indices, counted)]."""
    model.eval()
    loss_sum, n_tokens = 0.0, 0
    with torch.no_grad():
        for idx, counted in batches:
            batch = collate_left_padded([examples[i] for i in idx], pad_id)
            window = loss_window(batch["labels"])  # window and counts from the CPU labels: no wait for the GPU
            n_trained = count_trained_tokens(batch["labels"])
            batch = {k: v.to(rt.device) for k, v in batch.items()}
            labels = batch.pop("labels")
            loss = token_loss_sum(model(**batch, use_cache=False, logits_to_keep=window).logits, labels)
            if counted:  # on the device, read once below
                loss_sum, n_tokens = loss_sum + loss.double(), n_tokens + n_trained
    model.train()
    loss_sum = float(loss_sum)
    loss_sum, n_tokens = all_reduce_sum([loss_sum, n_tokens], rt)
    return loss_sum / max(n_tokens, 1)


def eval_plan(eval_examples, cfg: Config, rt) -> list[tuple[list[int], bool]]:
    """This rank's eval batches as [(example indices, counted)]. Every forward gathers weights from all ranks, so all
    ranks run as many: a rank short of a batch runs its first one again without counting it."""
    if not eval_examples:
        return []
    all_eval = plan_batches([len(e["input_ids"]) for e in eval_examples], cfg.batch_size, 0, 0, True)
    eval_batches = [(idx, True) for idx in all_eval[rt.rank::rt.world_size]]
    rounds = math.ceil(len(all_eval) / rt.world_size)
    return eval_batches + [(all_eval[0], False)] * (rounds - len(eval_batches))


def resume(model, optimizer, scheduler, out: Path, log) -> int:
    """--resume: this rank's shards of the adapters and optimizer, the schedule and RNG of the latest checkpoint;
    returns its step (0: none)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    ckpt = resume_checkpoint(out)  # rank 0's latest, on every rank
    if ckpt is None:
        log.info(f"--resume: no checkpoint in {out / 'checkpoints'}, starting from step 0")
        return 0
    model_state, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(ckpt))  # each rank reads its own shards
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    trainer_state = load_sharded_trainer_state(ckpt)  # step, RNG
    scheduler.load_state_dict(trainer_state["scheduler"])
    start_step = trainer_state["step"]
    log.info(f"resumed from {ckpt} at step {start_step}")
    return start_step


def save_shards(model, optimizer, scheduler, out: Path, step: int, keep_last: int) -> Path:
    """A checkpoint for --resume: every rank writes its shards of the adapters and optimizer (not the base) with
    torch.distributed.checkpoint, rank 0 the schedule and RNG; every rank must call it. Returns the folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    state = {"model": model_state, "optimizer": optim_state}

    def write_shards(tmp):
        dcp.save(state, checkpoint_id=str(tmp))

    return save_sharded_checkpoint(out, step, keep_last, write_shards, extra={"scheduler": scheduler.state_dict()})


def log_startup(log, cfg: Config, model_dir, model, counts, dtype, precision, checkpointing, data_lines, plan,
                lengths, total_steps, rt):
    """The start-up block: model, sharding, data (with one rendered example), batches and steps."""
    trainable, total = counts
    log.info(f"model    {cfg.model_path} ({model_dir}) | nf4 base (stored as {dtype}) + LoRA r={cfg.lora_r} on "
             f"{','.join(cfg.lora_target_modules)} | trainable {trainable:,} / {total:,} params "
             f"({100 * trainable / total:.2f}%) | {precision.reason} | "
             f"activation checkpointing {'on' if checkpointing else 'off'}")
    log.info(f"fsdp     fully_shard on {model.config.num_hidden_layers} layers + root over {rt.world_size} rank(s), "
             f"reshard after forward {'on' if cfg.reshard_after_forward else 'off'}, "
             f"cpu offload {'on' if cfg.cpu_offload else 'off'} | loaded layer by layer from the meta device")
    for line in data_lines:
        log.info(line)
    batches_per_epoch = len(plan(0))
    rows_per_step = cfg.batch_size * cfg.grad_accum * rt.world_size
    row_kind = "packed rows" if cfg.packing else "examples"
    log.info(f"batches  {batches_per_epoch} per epoch per rank | batch {cfg.batch_size} x accum {cfg.grad_accum} x "
             f"{rt.world_size} ranks = {rows_per_step} {row_kind}/step | "
             f"padding efficiency {padding_efficiency(plan(0), lengths):.3f}")
    log.info(f"steps    {total_steps} ({total_steps * cfg.grad_accum / batches_per_epoch:.2f} epochs), "
             f"lr {cfg.lr:g} warmup {int(cfg.warmup_ratio * total_steps)} | device {rt.describe()}")


def save_final(model, tokenizer, final_dir: Path, rt):
    """The adapters gathered to rank 0 (the 4-bit base stays where it is) and written as sft/qlora writes them, with
    the tokenizer and generation_config.json; every rank takes part in the gather."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    adapters = get_model_state_dict(model, options=options)

    def write(d):
        model.save_pretrained(d, state_dict=adapters)
        tokenizer.save_pretrained(d)
        save_generation_config(d, model, tokenizer)

    if rt.is_main:
        atomic_write_dir(final_dir, write)


def main(cfg: Config) -> dict:
    # ---- setup: a process group even for one process (fully_shard needs a device mesh), seed, device, threads
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    quiet_third_party_logs()
    set_single_process_env()
    rt = setup_runtime(cfg.seed, cpu_offload=cfg.cpu_offload)  # offloaded gradients: a gloo backend beside NCCL
    if cfg.cpu_offload and rt.device.type != "cuda":
        raise UserError("--cpu_offload=true: offloads GPU memory to the host; on CPU there is nothing to offload")
    out = Path(cfg.output_dir)

    # ---- tokenizer and data (the same examples as sft/qlora)
    model_dir = resolve_model_path(cfg.model_path)
    tokenizer = load_tokenizer(model_dir)
    examples, train_stats = build_examples(cfg, tokenizer, cfg.data_path)
    eval_examples, eval_stats = build_examples(cfg, tokenizer, cfg.eval_data_path) if cfg.eval_data_path else ([], None)
    # each packed row holds several examples; position ids and a block mask keep them independent
    train_examples = pack_examples(examples, cfg.max_seq_len) if cfg.packing else examples
    data_lines = sft_data_report(tokenizer, cfg.data_path, examples, train_stats, cfg.eval_data_path, eval_stats,
                                 train_examples if cfg.packing else None, cfg.max_seq_len)
    if cfg.inspect_data:  # a data-only run: nothing written, no model weights read
        if rt.is_main:
            print("\n".join(data_lines), flush=True)
        cleanup(rt)
        return {"inspect_data": True, "train_stats": train_stats, "eval_stats": eval_stats}
    if not dist.is_initialized():
        dist.init_process_group(process_group_backend(rt.device.type, cfg.cpu_offload))
    lengths = [len(e["input_ids"]) for e in train_examples]

    def plan(epoch):  # this rank's batches of one epoch, as many on every rank
        return plan_batches(lengths, cfg.batch_size, cfg.seed, epoch, cfg.group_by_length, rt.rank, rt.world_size)

    batches_per_epoch = len(plan(0))
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum)
    eval_batches = eval_plan(eval_examples, cfg, rt)
    prepare_output_dir(cfg, out, rt.is_main)  # refuses to mix this run into an earlier, different one
    log = StepLogger(out, total_steps, cfg.report_to, enabled=rt.is_main, config=config_to_dict(cfg))
    precision = training_precision(rt.device, "none")  # bf16; fp32 below compute capability 8.0 (no scaler)
    dtype = precision.dtype

    # ---- model: NF4 base and LoRA built on the meta device; then, layer by layer, weights read, quantized onto this
    # rank's device and sharded with fully_shard before the next layer; last the root (embeddings, norm, head)
    model = build_4bit_model_on_meta(model_dir, dtype, storage_dtype=dtype)  # 4-bit bytes stored as FSDP's dtype
    model.config.pad_token_id = tokenizer.pad_token_id
    checkpointing = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else rt.device.type == "cuda"
    model = prepare_for_lora_training(model, quantized=True, gradient_checkpointing=checkpointing)
    model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    model.peft_config["default"].base_model_name_or_path = str(model_dir)
    # counted on meta, where a 4-bit weight still has its full shape
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    # bf16 gathers for compute (the packed 4-bit bytes are bf16 already, so no cast touches them), fp32 gradient reduce
    mixed_precision = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy()

    def shard(module):
        fully_shard(module, mp_policy=mixed_precision, offload_policy=offload,
                    reshard_after_forward=cfg.reshard_after_forward)

    load_4bit_weights(model, model_dir, rt.device, on_layer=shard, seed=cfg.seed)
    shard(model)

    # ---- optimizer (torch AdamW over this rank's shard of the adapters) and schedule
    optimizer = torch.optim.AdamW(weight_decay_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  fused=rt.device.type == "cuda" and not cfg.cpu_offload)
    warmup_steps = int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup_steps))
    start_step = resume(model, optimizer, scheduler, out, log) if cfg.resume else 0
    log_startup(log, cfg, model_dir, model, (trainable, total), dtype, precision, checkpointing, data_lines, plan,
                lengths, total_steps, rt)

    # ---- training loop
    stream = batch_stream(plan, start_batch=start_step * cfg.grad_accum)  # resume: past what was trained on
    pad_id, attn = tokenizer.pad_token_id, model.config._attn_implementation

    def collate(rows):
        return collate_packed(rows, pad_id, attn) if cfg.packing else collate_left_padded(rows, pad_id)

    if eval_examples and start_step == 0:
        log.log(0, {"eval_loss": evaluate(model, eval_batches, eval_examples, pad_id, rt)})
    model.train()
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
            model.set_requires_gradient_sync(i == len(chunk) - 1)  # reduce-scatter once per step
            logits = model(**batch, use_cache=False, logits_to_keep=window).logits
            micro_loss = token_loss_sum(logits, labels)
            # the reduce-scatter averages gradients over ranks: scale by world_size to sum all ranks' tokens
            (micro_loss * rt.world_size / max(n_trained, 1)).backward()
            loss_sum += micro_loss.detach().double()  # stays on the device: no wait per micro-batch
        trained_params = [p for p in model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(trained_params, cfg.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        (loss_sum,) = all_reduce_sum([float(loss_sum)], rt)  # the step's one read of the device losses
        loss = loss_sum / max(n_trained, 1)
        if not is_finite(loss, grad_norm):  # checked before any update
            if cfg.on_nan == "stop":
                raise non_finite_error(step, loss, grad_norm, out)
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            log.info(f"step {step}/{total_steps}: loss {loss}, gradient norm {float(grad_norm)}: "
                     "skipped (--on_nan=skip)")
            continue
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        train_seconds += dt
        tokens_seen += int(n_tokens)
        tokens_computed += int(n_computed)
        losses.append(loss)
        log.advance()
        if step % cfg.log_every == 0 or step == total_steps:
            log.log(step, {"loss": loss, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                           "tokens_per_s": n_tokens / dt, "tokens_per_s_per_gpu": n_tokens / dt / rt.world_size,
                           **memory_gb(rt.device)})
        if eval_examples and cfg.eval_every > 0 and step % cfg.eval_every == 0 and step != total_steps:
            log.log(step, {"eval_loss": evaluate(model, eval_batches, eval_examples, pad_id, rt)})
        preempted = stop_requested(stop, rt)
        if cfg.save_every > 0 and step % cfg.save_every == 0 or preempted:
            path = save_shards(model, optimizer, scheduler, out, step, cfg.keep_last)
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

    # ---- save: the adapters gathered to rank 0 (the 4-bit base stays where it is), as sft/qlora writes them
    final_dir = out / "final"
    save_final(model, tokenizer, final_dir, rt)
    eval_loss = None
    if eval_examples:
        eval_loss = evaluate(model, eval_batches, eval_examples, pad_id, rt)
        log.log(total_steps, {"eval_loss": eval_loss})
    log.info(f"done: {total_steps - start_step} steps in {train_seconds:.1f}s, "
             f"{tokens_seen / max(train_seconds, 1e-9):,.0f} tok/s, peak mem {peak_memory_gb(rt.device):.2f} GB")
    log.info(f"adapter and tokenizer in {final_dir}; metrics in {out / 'metrics.jsonl'}, curve in {out / 'loss.png'}")
    log.info(f"use it: python tools/merge_lora.py --base={cfg.model_path} --adapter={final_dir} --out=merged")
    log.close()
    cleanup(rt)
    return {"model": model, "tokenizer": tokenizer, "losses": losses, "eval_loss": eval_loss, "final_dir": final_dir,
            "train_seconds": train_seconds, "tokens": tokens_seen, "tokens_computed": tokens_computed,
            "steps": total_steps - start_step}


if __name__ == "__main__":
    with exit_on_user_error():
        main(parse_config(Config))
