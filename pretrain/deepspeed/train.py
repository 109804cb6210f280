"""Pretraining a Llama-family model under DeepSpeed: random init from a model config (or continued from a checkpoint),
packed windows streamed from jsonl.zst shards or a pre-tokenized token file, ZeRO stage 1 by default.

Default run, no GPU, no download (tiny config, random init, the bundled English/Chinese corpus), about a minute:
    cd pretrain/deepspeed && bash run.sh
A 1B model from scratch on 8 GPUs, on a token file (data_scripts/shard_corpus.py -> train_tokenizer.py ->
pretokenize.py):
    NGPU=8 bash run.sh --model_config=1b --tokenizer_path=/tok --data_path=/data/tokens.bin --seq_len=2048 \
        --batch_size=8
Continue pretraining a checkpoint (a grown tokenizer resizes the embeddings, new rows at the mean):
    bash run.sh --init_from=/models/Llama-2-7b-hf --tokenizer_path=/tok-merged --data_path=/data/zh --zero_stage=3
Several nodes: HOSTFILE=hostfile bash run.sh ...   Writes output_dir/: final/ (config.json, model.safetensors,
tokenizer), config.json, metrics.jsonl (loss, lr, grad_norm, tok/s, tok/s/gpu, MFU), loss.png, checkpoints/.
On a GPU: bf16, sdpa attention (flash-attention 2 when installed), torch's fused AdamW, activation checkpointing.
"""
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from common.checkpoint import atomic_write_dir, latest_checkpoint, prepare_output_dir, resume_checkpoint
from common.config import UserError, config_to_dict, exit_on_user_error, parse_config
from common.deepspeed_utils import (
    fill_ds_config,
    gather_full_state_dict,
    init_distributed,
    load_deepspeed_checkpoint,
    quiet_deepspeed_warnings,
    read_ds_config,
    save_deepspeed_checkpoint,
)
from common.logs import StepLogger, memory_gb, peak_memory_gb, quiet_third_party_logs
from common.losses import count_trained_tokens, is_finite, non_finite_error, token_loss_sum
from common.model import (
    grow_vocabulary,
    load_tokenizer,
    pretrain_model_config,
    pretrain_tokenizer_dir,
    resolve_attention,
    resolve_model_path,
)
from common.optim import warmup_cosine, weight_decay_groups
from common.pretrain_data import eval_batches, flops_per_token, open_token_source, packed_loader, peak_tflops
from common.runtime import (
    all_reduce_sum,
    catch_stop_signals,
    cleanup,
    save_timeout,
    set_single_process_env,
    setup_runtime,
    stop_requested,
    training_precision,
    wait_for_all,
)

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Config:
    # model
    model_config: str = "tiny"  # tiny, 1b, 7b, 65b (common/model_configs) or a config.json path: random init
    init_from: str = ""  # a Hugging Face checkpoint folder to continue pretraining (model_config is then ignored)
    tokenizer_path: str = "tiny"  # a tokenizer folder; 'tiny': the tiny Llama's; '' with init_from: its own
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"  # auto: FA2 on GPU if installed
    gradient_checkpointing: bool | None = None  # recompute activations in backward; None: on with a GPU
    # DeepSpeed ZeRO
    zero_stage: Literal[0, 1, 2, 3] = 1  # 1: optimizer states partitioned over ranks; 3 for models too big for one GPU
    ds_config: str = str(Path(__file__).resolve().with_name("ds_config.json"))  # DeepSpeed's own knobs (buckets...)
    # data
    data_path: str = str(REPO / "data" / "pretrain" / "shards")  # shards folder / manifest / .jsonl(.zst), tokens.bin
    eval_data_path: str = ""  # held-out shards or token file; '' for none
    text_field: str = "text"  # record field holding a document
    seq_len: int = 256  # tokens per packed window
    document_mask: bool = False  # documents packed in one window do not attend to each other
    num_workers: int = 1  # loader processes tokenizing ahead, per rank (0: in the training process)
    # optimization
    max_steps: int = 120  # optimizer steps
    batch_size: int = 8  # windows per micro-batch per GPU
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate (tiny model; 7B-65B: 1.5e-4 to 3e-4)
    weight_decay: float = 0.1  # AdamW decay on matrices (not norms)
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW beta1,beta2 (Llama paper)
    warmup_steps: int = 10  # linear warmup, then cosine decay to 10%
    max_grad_norm: float = 1.0  # gradient clipping
    seed: int = 42  # seeds init and the token-file order
    peak_tflops: float = 0.0  # GPU peak for MFU; 0: looked up from the device name (none on CPU)
    # output, logging, checkpoints
    output_dir: str = "./out"  # everything this run writes
    log_every: int = 10  # steps between step-log lines
    eval_every: int = 0  # steps between evals (with eval_data_path); 0: before training and at the end only
    eval_batches: int = 8  # micro-batches per rank in an eval
    save_every: int = 0  # steps between checkpoints for --resume; 0: none
    keep_last: int = 2  # checkpoints kept
    resume: bool = False  # continue from the latest checkpoint in output_dir
    overwrite: bool = False  # replace an earlier, different run in output_dir (else refused)
    on_nan: Literal["stop"] = "stop"  # a nan/inf loss stops before its update (DeepSpeed updates inside engine.step)
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb, mlflow or none


def build_model(cfg: Config, tokenizer, dtype, device, attn: str, gather):
    """Random init from a config, or a checkpoint; the vocabulary grown to the tokenizer's if it is larger."""
    from transformers import AutoModelForCausalLM

    if cfg.init_from:
        path = resolve_model_path(cfg.init_from, option="init_from")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn, local_files_only=True,
                                                     trust_remote_code=False)
    else:
        config = pretrain_model_config(cfg.model_config, "", tokenizer)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    added = grow_vocabulary(model, len(tokenizer), gather)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device), added


def gathered_on_rank0(params):
    """Under ZeRO-3: a context in which partitioned parameters are whole, rank 0's edits partitioned back on exit."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def save_final(final_dir: Path, model, state_dict: dict, tokenizer):
    """Rank 0: the gathered weights and the tokenizer as one Hugging Face checkpoint, written atomically."""
    def write(directory: Path):
        model.save_pretrained(directory, state_dict=state_dict)
        tokenizer.save_pretrained(directory)

    atomic_write_dir(final_dir, write)


def main(cfg: Config) -> dict:
    # ---- setup: one process group even for one process (DeepSpeed needs it), then seed, device, threads
    import deepspeed

    if len(cfg.adam_betas) != 2:
        raise UserError(f"--adam_betas: expected two numbers beta1,beta2, got {cfg.adam_betas}")
    quiet_third_party_logs()
    quiet_deepspeed_warnings()
    set_single_process_env()
    rt = setup_runtime(cfg.seed)
    init_distributed()
    out = Path(cfg.output_dir)
    prepare_output_dir(cfg, out, rt.is_main)  # refuses to mix this run into an earlier, different one
    log = StepLogger(out, cfg.max_steps, cfg.report_to, enabled=rt.is_main, config=config_to_dict(cfg))
    precision = training_precision(rt.device, "deepspeed")  # bf16; fp16 below compute capability 8.0
    dtype = precision.dtype

    # ---- tokenizer and data: packed windows, each rank x loader worker reading its own slot of the corpus
    tokenizer_dir = pretrain_tokenizer_dir(cfg.tokenizer_path, cfg.init_from)
    tokenizer = load_tokenizer(tokenizer_dir)
    train_source = open_token_source(cfg.data_path, tokenizer, cfg.text_field)
    eval_source = open_token_source(cfg.eval_data_path, tokenizer, cfg.text_field) if cfg.eval_data_path else None
    attn = resolve_attention(cfg.attn_implementation, rt.device)
    # documents kept apart: flash-attention 2 by their restarting position ids alone, sdpa with a block mask too
    mask_mode = ("positions" if attn == "flash_attention_2" else "sdpa") if cfg.document_mask else "none"

    # ---- DeepSpeed config (the Config owns these values; ds_config.json only DeepSpeed's own knobs)
    owned = {
        "train_micro_batch_size_per_gpu": (cfg.batch_size, "--batch_size"),
        "gradient_accumulation_steps": (cfg.grad_accum, "--grad_accum"),
        "train_batch_size": (cfg.batch_size * cfg.grad_accum * rt.world_size, "--batch_size x --grad_accum x ranks"),
        "gradient_clipping": (cfg.max_grad_norm, "--max_grad_norm"),
        "bf16.enabled": (dtype == torch.bfloat16, "the device (bf16 from compute capability 8.0)"),
        "fp16.enabled": (dtype == torch.float16, "the device (fp16 below compute capability 8.0)"),
        "zero_optimization.stage": (cfg.zero_stage, "--zero_stage"),
        "zero_allow_untested_optimizer": (True, "train.py (it hands DeepSpeed torch's AdamW)"),
        "optimizer": (None, "--lr, --adam_betas, --weight_decay"),
        "scheduler": (None, "--warmup_steps (warmup then cosine, a LambdaLR)"),
    }
    ds_config = fill_ds_config(read_ds_config(cfg.ds_config), owned, cfg.ds_config)

    # ---- model: under ZeRO-3 built inside deepspeed.zero.Init (HfDeepSpeedConfig), so no rank holds it whole
    hf_zero3, gather = None, None
    if cfg.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_zero3 = HfDeepSpeedConfig(ds_config)  # noqa: F841  (must stay alive while transformers builds the model)
        gather = gathered_on_rank0
    model, added_rows = build_model(cfg, tokenizer, dtype, rt.device, attn, gather)
    checkpointing = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else rt.device.type == "cuda"
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    flops_token = flops_per_token(model.config, cfg.seq_len)
    peak = peak_tflops(rt.device, cfg.peak_tflops)

    # ---- optimizer (torch AdamW, fused on GPU) and schedule, handed to DeepSpeed
    optimizer = torch.optim.AdamW(weight_decay_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=tuple(cfg.adam_betas), fused=rt.device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.max_steps, cfg.warmup_steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    start_step = 0
    if cfg.resume:
        ckpt = resume_checkpoint(out)  # rank 0's latest, on every rank
        if ckpt is None:
            log.info(f"--resume: no checkpoint in {out / 'checkpoints'}, starting from step 0")
        else:
            start_step = load_deepspeed_checkpoint(engine, ckpt)  # weights, optimizer, scheduler, RNG
            log.info(f"resumed from {ckpt} at step {start_step}")

    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * rt.world_size
    origin = f"from {cfg.init_from}" if cfg.init_from else "random init"
    grown = f", {added_rows} new token rows at the mean embedding" if added_rows else ""
    masked = ", documents masked from each other" if cfg.document_mask else ""
    log.info(f"model    {cfg.init_from or cfg.model_config}: {n_params:,} params ({origin}{grown}) | {attn} attention, "
             f"{precision.reason} | activation checkpointing {'on' if checkpointing else 'off'} | "
             f"{flops_token / 1e6:,.1f} MFLOPs/token")
    log.info(f"zero     stage {cfg.zero_stage} | {type(optimizer).__name__} | config {cfg.ds_config}")
    log.info(f"data     train {cfg.data_path}: {train_source.describe()} | tokenizer {tokenizer_dir} "
             f"({len(tokenizer):,} tokens) | windows of {cfg.seq_len}{masked} | {cfg.num_workers} loader worker(s)")
    log.info(f"steps    {cfg.max_steps} x {tokens_per_step:,} tokens (batch {cfg.batch_size} x accum {cfg.grad_accum} "
             f"x {rt.world_size} ranks), lr {cfg.lr:g} warmup {cfg.warmup_steps} | device {rt.describe()}")

    def evaluate() -> float:
        """Mean loss per predicted token over eval_batches micro-batches per rank (the same count on every rank,
        as ZeRO-3 needs: a short eval set wraps around)."""
        engine.eval()
        loss_sum = n_tokens = 0.0
        batches = eval_batches(eval_source, cfg.seq_len, cfg.batch_size, rt.rank, rt.world_size, cfg.seed,
                               cfg.eval_batches, mask_mode)
        with torch.no_grad():
            for batch, counted in batches:  # uncounted: a rank with no eval document still joins every forward
                n_tokens += count_trained_tokens(batch["labels"]) if counted else 0  # FA2 rows joined: not numel
                batch = {k: v.to(rt.device) for k, v in batch.items()}
                labels = batch.pop("labels")
                loss = token_loss_sum(engine(**batch, use_cache=False).logits, labels)
                loss_sum += loss.double() if counted else 0.0  # on the device, read once below
        engine.train()
        loss_sum = float(loss_sum)  # the eval's one read of the device losses
        loss_sum, n_tokens = all_reduce_sum([loss_sum, n_tokens], rt)
        return loss_sum / n_tokens

    # ---- training loop
    # endless batches, the first start_step * grad_accum skipped by the loader itself (each worker past its share)
    batches = packed_loader(train_source, cfg.seq_len, cfg.batch_size, rt.rank, rt.world_size, cfg.num_workers,
                            cfg.seed, mask_mode, start_batch=start_step * cfg.grad_accum)
    engine.train()
    if eval_source and start_step == 0:
        log.log(0, {"eval_loss": evaluate()})
    train_seconds, losses = 0.0, []
    predicted_per_step = cfg.batch_size * (cfg.seq_len - 1) * cfg.grad_accum * rt.world_size
    stop, preempted, path = catch_stop_signals(), False, None  # SIGTERM / Ctrl-C: checkpoint, then exit
    for step in range(start_step + 1, cfg.max_steps + 1):
        t0 = time.perf_counter()
        loss_sum = 0.0
        for i in range(cfg.grad_accum):
            batch = {k: v.to(rt.device, non_blocking=True) for k, v in next(batches).items()}
            labels = batch.pop("labels")
            micro_loss = token_loss_sum(engine(**batch, use_cache=False).logits, labels)
            loss_sum += micro_loss.detach().double()  # stays on the device: no wait per micro-batch
            if i == cfg.grad_accum - 1:  # engine.step() updates at this one: read the step's losses once, before it
                loss_sum = float(loss_sum)
                # summed over the ranks first: a nan on any rank stops every rank, none is left waiting in backward
                (loss_sum,) = all_reduce_sum([loss_sum], rt)
                loss = loss_sum / predicted_per_step
                # the gradient norm is known only inside engine.step(), which clips and updates in one call: the
                # loss is what can be checked before the update
                if not is_finite(loss, None):
                    raise non_finite_error(step, loss, None, out)
            # mean over every predicted token of the step on all ranks (DeepSpeed averages over ranks: * world)
            engine.backward(micro_loss * rt.world_size / predicted_per_step, scale_wrt_gas=False)
            engine.step()  # optimizer, schedule and clipping only after the grad_accum-th micro-batch
        # DeepSpeed's norm of this step's gradient, the same on every rank. ZeRO and DeepSpeed's bf16/fp16 optimizers
        # withhold an update whose norm is not finite (their overflow check): the weights are still the last step's.
        # In fp16 that is a loss-scale overflow, skipped and answered by a lower scale: only the loss counts then
        grad_norm = engine.get_global_grad_norm()
        if not is_finite(loss, grad_norm, loss_scaled=dtype == torch.float16):
            raise non_finite_error(step, loss, grad_norm, out)
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        train_seconds += dt
        losses.append(loss)
        log.advance()
        if step % cfg.log_every == 0 or step == cfg.max_steps or step == start_step + 1:
            per_gpu = tokens_per_step / dt / rt.world_size
            log.log(step, {"loss": loss, "lr": scheduler.get_last_lr()[0],
                           "grad_norm": None if grad_norm is None else float(grad_norm),
                           "tokens_per_s": tokens_per_step / dt, "tokens_per_s_per_gpu": per_gpu,
                           "mfu": per_gpu * flops_token / (peak * 1e12) if peak else None,
                           **memory_gb(rt.device)})
        if eval_source and cfg.eval_every > 0 and step % cfg.eval_every == 0 and step != cfg.max_steps:
            log.log(step, {"eval_loss": evaluate()})
        preempted = stop_requested(stop, rt)
        if (cfg.save_every > 0 and step % cfg.save_every == 0 or preempted):
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

    # ---- save: the whole model gathered from the partitions, as one Hugging Face checkpoint; final eval
    final_dir = out / "final"
    state_dict = gather_full_state_dict(engine)
    if rt.is_main:
        save_final(final_dir, model, state_dict, tokenizer)
    del state_dict
    wait_for_all(save_timeout(n_params * dtype.itemsize))  # rank 0 wrote it; NCCL's own limit is 10 minutes
    eval_loss = None
    if eval_source:
        eval_loss = evaluate()
        log.log(cfg.max_steps, {"eval_loss": eval_loss})
    steps_run = cfg.max_steps - start_step
    tokens_per_s = steps_run * tokens_per_step / max(train_seconds, 1e-9)
    log.info(f"done: {steps_run} steps in {train_seconds:.1f}s, {tokens_per_s:,.0f} tok/s, "
             f"peak mem {peak_memory_gb(rt.device):.2f} GB")
    log.info(f"model and tokenizer in {final_dir}; metrics in {out / 'metrics.jsonl'}, curve in {out / 'loss.png'}")
    log.close()
    cleanup(rt)
    return {"model": model, "tokenizer": tokenizer, "losses": losses, "eval_loss": eval_loss, "final_dir": final_dir,
            "train_seconds": train_seconds, "steps": steps_run, "flops_per_token": flops_token}


if __name__ == "__main__":
    with exit_on_user_error():
        main(parse_config(Config))
