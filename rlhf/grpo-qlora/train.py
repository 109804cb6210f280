"""Group relative policy optimization (GRPO, Shao et al. 2024) with QLoRA: a frozen 4-bit NF4 base, LoRA adapters
(fresh, or an SFT adapter that keeps training). Each step samples group_size completions of every prompt, scores them
(a Python reward function, a cls/reward-qlora reward model, or both, added up) and makes the completions that beat
their group's mean more likely, with a KL penalty to the reference; no value model. README.md: pipeline, options.
    bash run.sh        (tiny random-init Llama, bundled reversal prompts, CPU, a minute; NGPU=N: data-parallel)
    bash run.sh --model_path=/models/Llama-2-7b-hf --init_adapter=../../sft/qlora/out/final --data_path=prompts.jsonl \
        --reward_fn=my_rewards.py:score --reward_model=../../cls/reward-qlora/out/final        (a real model, a GPU)
Per completion token (prompt, pads masked), A = (r - group mean) / (group sample std + 1e-4) (DeepSeekMath's; a group
of equal rewards gets A = 0: nothing to learn, no 0/0), ratio = exp(logp - logp_old) (1 with one update per batch):
    loss = -min(ratio A, clip(ratio, 1 - clip_eps, 1 + clip_eps) A) + kl_beta (exp(ref - logp) - (ref - logp) - 1)
summed over the step's completion tokens (all ranks), divided by their count: every token weighs the same however
long its answer (a per-completion mean weighs long answers' tokens less), whatever the micro-batches and ranks.
Writes output_dir/: final/ (adapter, tokenizer, generation_config.json), eval_results.json, metrics.jsonl, checkpoints/.
"""
import contextlib
import dataclasses
import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from common.checkpoint import atomic_write_dir, prepare_output_dir, resume_adapter_training, save_checkpoint
from common.config import UserError, config_to_dict, exit_on_user_error, parse_config, refuse_values_below
from common.data import batch_stream, collate_left_padded, plan_batches, read_records
from common.inference import (
    greedy_eval,
    load_reward_function,
    load_reward_model,
    make_generation_config,
    prompts_report,
    read_adapter_config,
    sample_completions,
    sampling_prompts,
    save_generation_config,
    score_completions,
)
from common.logs import StepLogger, memory_gb, peak_memory_gb, quiet_third_party_logs
from common.losses import is_finite, loss_window, non_finite_error, token_logprobs
from common.model import add_lora, load_model, load_tokenizer, prepare_for_lora_training, resolve_model_path
from common.optim import make_optimizer, resolve_lr, warmup_cosine
from common.runtime import (
    all_reduce_sum,
    catch_stop_signals,
    cleanup,
    setup_runtime,
    stop_requested,
    training_precision,
)

HERE = Path(__file__).resolve().parent


@dataclass
class Config:
    # model
    model_path: str = "tiny"  # 'tiny' (random-init test Llama) or a local Hugging Face model folder
    init_adapter: str = ""  # an SFT LoRA folder (sft/qlora/out/final) to start from and keep training; '': fresh LoRA
    quantization: Literal["nf4", "int8", "none"] = "nf4"  # base weights: 4-bit NormalFloat, 8-bit, or as stored
    gradient_checkpointing: bool | None = None  # recompute activations in backward (less memory); None: on with a GPU
    lora_r: int = 16  # adapter rank (a fresh adapter; --init_adapter brings its own)
    lora_alpha: int = 32  # adapter scale is alpha / r
    lora_dropout: float = 0.0  # 0: the sampled policy and the trained one are the same function (dropout would differ)
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # or e.g. q_proj,v_proj
    lora_modules_to_save: list[str] = field(default_factory=list)  # trained in full beside LoRA, e.g. lm_head
    # data and rewards (a reward function, a reward model, or both: added up)
    reward_fn: str = f"{HERE / 'rewards.py'}:score"  # path.py:function(prompts, completions, records) -> floats; ''
    reward_model: str = ""  # a cls/reward-qlora out/final folder (adapter, score head, reward_model.json); '': none
    data_path: str = str(HERE.parents[1] / "data/synthetic/reverse_train.jsonl")  # prompt records (see the docstring)
    eval_data_path: str = str(HERE.parents[1] / "data/synthetic/reverse_eval.jsonl")  # held out, answered greedily
    prompt_template: Literal["alpaca", "chat"] = "alpaca"  # chat: the tokenizer's chat template for every record
    max_prompt_len: int = 512  # longer prompts lose tokens from the left (the BOS stays)
    # sampling and the objective
    group_size: int = 8  # completions sampled per prompt (G); advantages are taken within each prompt's group
    batch_size: int = 4  # prompts per micro-batch per rank; the micro-batch's rows are their batch_size * group_size
    max_new_tokens: int = 16  # most tokens per completion (the bundled answers need at most 7 with EOS)
    temperature: float = 1.0  # sampling temperature; the log-probs are taken at the same temperature
    kl_beta: float = 0.04  # weight of the k3 KL estimate to the reference (DeepSeekMath: 0.04); 0: no reference pass
    clip_eps: float = 0.2  # the ratio is clipped to [1 - eps, 1 + eps] (PPO)
    updates_per_batch: int = 1  # optimizer updates per generation batch (GRPO's mu); > 1: the clip acts
    scale_rewards: bool = True  # divide the group-centred rewards by the group's std (GRPO); false: centred only
    grad_accum: int = 1  # micro-batches per step: batch_size * grad_accum prompts sampled per rank and step
    # optimization
    max_steps: int = 20  # steps, each one generation batch and updates_per_batch optimizer updates
    lr: float | None = None  # peak lr; none: 1e-5 for a real base (GRPO + LoRA: 1e-6..5e-5), 5e-5 on 'tiny'
    warmup_ratio: float = 0.0  # fraction of steps with linear warmup, then cosine decay to 10%
    max_grad_norm: float = 1.0  # gradient clipping
    optim: Literal["paged_adamw_8bit", "adamw_8bit", "adamw"] = "paged_adamw_8bit"  # 8-bit ones need a GPU
    seed: int = 42  # seeds LoRA init, prompt order and sampling (each rank its own sampling stream)
    # output, logging, checkpoints
    output_dir: str = "./out"  # everything this run writes
    log_every: int = 1  # steps between step-log lines
    eval_every: int = 0  # steps between evals; 0: only before training and at the end
    save_every: int = 0  # steps between checkpoints for --resume; 0: none
    keep_last: int = 2  # checkpoints kept
    resume: bool = False  # continue from the latest checkpoint in output_dir
    overwrite: bool = False  # replace an earlier, different run in output_dir (else refused)
    on_nan: Literal["stop", "skip"] = "stop"  # a nan/inf loss or gradient: stop before updating, or skip the update
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb, mlflow or none


def refuse_bad_options(cfg: Config):
    """The settings GRPO cannot run with, each as one line naming the option."""
    refuse_values_below(cfg, {"group_size": 2, "batch_size": 1, "max_new_tokens": 1, "updates_per_batch": 1,
                              "grad_accum": 1, "max_prompt_len": 2, "max_steps": 1, "kl_beta": 0})
    if not cfg.reward_fn and not cfg.reward_model:
        raise UserError("no reward: give --reward_fn=file.py:function, --reward_model=reward-qlora out/final, or both")


@contextlib.contextmanager
def reference_policy(model):
    """The KL reference for a no-grad forward: the frozen 'reference' copy of --init_adapter, else the base. set_adapter
    also sets requires_grad (active: trainable unless inference_mode), so 'default' is made active again right after."""
    if "reference" not in model.peft_config:
        with model.disable_adapter():
            yield model
        return
    model.set_adapter("reference", inference_mode=True)
    try:
        yield model
    finally:
        model.set_adapter("default")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """(r - group mean) / (group sample std + eps) over consecutive groups of group_size; only centred if not scale."""
    groups = rewards.double().view(-1, group_size)
    centred = groups - groups.mean(1, keepdim=True)
    return (centred / (groups.std(1, keepdim=True) + eps) if scale else centred).view(-1)


def grpo_token_losses(logps, old_logps, ref_logps, advantages, clip_eps: float, kl_beta: float):
    """Per-token clipped policy-gradient loss plus kl_beta times the k3 KL estimate, [rows, tokens]; also the k3
    values and where the clip acted (the clipped term was the smaller). Mask the prompt and pad columns after."""
    ratio = torch.exp(logps - old_logps)
    advantages = advantages[:, None].to(logps)
    unclipped, clipped = ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages
    log_ratio_ref = ref_logps - logps
    kl = torch.exp(log_ratio_ref) - log_ratio_ref - 1
    return -torch.min(unclipped, clipped) + kl_beta * kl, kl, clipped < unclipped


def completion_logps(model, rows: list[dict], pad_id: int, device, temperature: float):
    """Log-probs and mask of rows' completion tokens (labels: the completion, -100 on the prompt), logits only there."""
    batch = collate_left_padded(rows, pad_id)
    window = loss_window(batch["labels"])  # from the CPU labels: no wait for the GPU
    labels = batch.pop("labels")
    logits = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False, logits_to_keep=window).logits
    return token_logprobs(logits / temperature, labels.to(logits.device))


def frozen_logps(model, micro: list, cfg: Config, pad_id: int, device, autocast):
    """Per micro-batch, before the first update: old log-probs (with several updates) and the reference's (kl_beta)."""
    with torch.no_grad(), autocast:
        old = [completion_logps(model, rows, pad_id, device, cfg.temperature)[0] for rows, _ in micro] \
            if cfg.updates_per_batch > 1 else None
        with reference_policy(model):
            ref = [completion_logps(model, rows, pad_id, device, cfg.temperature)[0] for rows, _ in micro] \
                if cfg.kl_beta > 0 else None
    return old, ref


def policy_update(train_model, micro: list, old: list | None, ref: list | None, n_trained: float, cfg: Config,
                  pad_id: int, device, rt, scaler, autocast) -> torch.Tensor:
    """Forward and backward over the micro-batches (rows, advantages); this rank's loss, k3 KL and clipped sums."""
    sums = torch.zeros(3, dtype=torch.float64)
    for i, (rows, advantages) in enumerate(micro):
        sync = i == len(micro) - 1 or not rt.distributed
        with (contextlib.nullcontext() if sync else train_model.no_sync()), autocast:
            logps, mask = completion_logps(train_model, rows, pad_id, device, cfg.temperature)
            old_logps = old[i].to(logps.device) if old else logps.detach()  # one update: ratio 1
            ref_logps = ref[i].to(logps.device) if ref else logps.detach()  # kl_beta 0: no reference pass
            losses, kl, clipped = grpo_token_losses(logps, old_logps, ref_logps, advantages, cfg.clip_eps, cfg.kl_beta)
            loss_sum = (losses * mask).sum()
        # the mean over the completion tokens of the whole step on all ranks (DDP averages, hence * world_size)
        scaler.scale(loss_sum * rt.world_size / max(n_trained, 1)).backward()
        sums += torch.stack([loss_sum.detach(), (kl * mask).sum().detach(), (clipped & mask).sum()]).double().cpu()
    return sums


def log_values(log, step: int, total_steps: int, values: dict):
    """A step's (or an eval's) metrics to metrics.jsonl and the trackers, and one line with all of them."""
    log.log(step, values, echo=False)
    log.info(" | ".join([f"step {step}/{total_steps}", *(f"{k} {v:.4g}" for k, v in values.items())]))


def save_final(model, tokenizer, final_dir: Path, rt):
    """The trained adapter (not the reference copy), tokenizer and generation_config.json in final/, by rank 0."""
    def write(d):
        model.save_pretrained(d, selected_adapters=["default"])
        tokenizer.save_pretrained(d)
        save_generation_config(d, model, tokenizer)

    if rt.is_main:
        atomic_write_dir(final_dir, write)


def load_policy(cfg: Config, model_dir: Path, init_adapter: Path | None, dtype, rt):
    """The NF4 base with LoRA: a fresh adapter, or the SFT adapter trainable plus a frozen copy ('reference')."""
    model = load_model(model_dir, cfg.quantization, dtype, {"": rt.device} if rt.device.type == "cuda" else None)
    checkpointing = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else rt.device.type == "cuda"
    model = prepare_for_lora_training(model, cfg.quantization != "none", checkpointing)
    if not init_adapter:
        return add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules,
                        modules_to_save=cfg.lora_modules_to_save or None)
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
    if cfg.kl_beta > 0:
        model.load_adapter(init_adapter, adapter_name="reference", is_trainable=False)
    for dropout in (m for m in model.modules() if isinstance(m, torch.nn.Dropout)):  # the log-probs in train mode
        dropout.p = cfg.lora_dropout  # are those of the policy that sampled (eval mode) only without dropout
    return model


def main(cfg: Config) -> dict:
    # ---- setup
    quiet_third_party_logs()
    lr = resolve_lr(cfg.lr, cfg.model_path, real_base_lr=1e-5, tiny_lr=5e-5)
    cfg = dataclasses.replace(cfg, lr=lr.value)  # config.json records the rate used
    refuse_bad_options(cfg)
    rt = setup_runtime(cfg.seed)
    out = Path(cfg.output_dir)
    precision = training_precision(rt.device, "grad_scaler")  # fp16 + GradScaler below compute capability 8.0
    dtype = precision.dtype
    scaler = torch.amp.GradScaler(rt.device.type, enabled=precision.grad_scaler)  # a no-op in bf16 and fp32
    autocast = torch.autocast("cuda", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    # ---- tokenizer, prompts and the reward function (before any weights: a mistake shows in seconds)
    model_dir = resolve_model_path(cfg.model_path)
    init_adapter = Path(cfg.init_adapter) if cfg.init_adapter else None
    if init_adapter:
        read_adapter_config(init_adapter, option="init_adapter")  # one clear line for a folder that is not an adapter
    tokenizer = load_tokenizer(init_adapter or model_dir)  # an SFT adapter's tokenizer is the one it trained with

    def prompts(path):
        return sampling_prompts(read_records(path), tokenizer, cfg.prompt_template, cfg.max_prompt_len)

    train_prompts, eval_prompts = prompts(cfg.data_path), prompts(cfg.eval_data_path) if cfg.eval_data_path else []
    sources = {"reward_fn": load_reward_function(cfg.reward_fn)} if cfg.reward_fn else {}

    def plan(epoch):  # this rank's prompts of one epoch, in full batches (every rank the same number of rows)
        batches = plan_batches([len(p["ids"]) for p in train_prompts], cfg.batch_size * cfg.grad_accum, cfg.seed,
                               epoch, False, rt.rank, rt.world_size)
        return [b for b in batches if len(b) == cfg.batch_size * cfg.grad_accum] or batches

    total_steps = cfg.max_steps
    prepare_output_dir(cfg, out, rt.is_main)  # refuses to mix this run into an earlier, different one
    log = StepLogger(out, total_steps, cfg.report_to, enabled=rt.is_main, config=config_to_dict(cfg))

    # ---- model: quantized base, LoRA adapters; the reward model
    model = load_policy(cfg, model_dir, init_adapter, dtype, rt)
    model.config.pad_token_id = tokenizer.pad_token_id
    input_device = model.get_input_embeddings().weight.device
    devices = sorted({p.device for p in model.parameters()}, key=str)
    trainable, total = model.get_nb_trainable_parameters()
    if cfg.reward_model:
        sources["reward_model"] = load_reward_model(cfg.reward_model, rt.device, dtype)
    train_model = model
    if rt.distributed:
        ddp_devices = [rt.local_rank] if rt.device.type == "cuda" else None
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ddp_devices)
    torch.manual_seed(cfg.seed + rt.rank)  # each rank samples its own completions (--resume restores the stream)

    # ---- optimizer and schedule
    optimizer = make_optimizer(model, cfg.optim, cfg.lr, 0.0, rt.device)  # no weight decay on the adapters
    warmup_steps = int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup_steps))
    start_step = resume_adapter_training(model, optimizer, scheduler, out, rt.device, log, scaler) if cfg.resume else 0
    adapter = f"the SFT adapter {init_adapter}" if init_adapter else f"LoRA r={cfg.lora_r}"
    reference = "off" if cfg.kl_beta == 0 else "the starting adapter, frozen" if init_adapter else "the base"
    log.info(f"model    {cfg.model_path} ({model_dir}) | {cfg.quantization} base + {adapter} | trainable "
             f"{trainable:,} / {total:,} params | KL reference {reference} | {precision.reason}")
    files = {"train": (cfg.data_path, train_prompts), "eval": (cfg.eval_data_path, eval_prompts)}
    log.info("\n".join([*prompts_report(files, cfg.max_prompt_len), f"rewards  {cfg.reward_fn} {cfg.reward_model}"]))
    log.info(f"steps    {total_steps} x {cfg.batch_size} prompts x {cfg.group_size} completions x {cfg.grad_accum} "
             f"accum x {rt.world_size} ranks, {cfg.updates_per_batch} update(s) each, lr {lr.description} | "
             f"{rt.describe()}")

    # ---- training loop
    stream = batch_stream(plan, start_batch=start_step)  # resume: past the prompts already used
    sampling = make_generation_config(model, tokenizer, cfg.max_new_tokens, True, cfg.temperature, 1.0, 0)
    greedy = make_generation_config(model, tokenizer, cfg.max_new_tokens)
    pad_id, mb = tokenizer.pad_token_id, cfg.batch_size * cfg.group_size  # rows of a micro-batch

    def evaluate():  # greedy answers to this rank's share of the eval prompts; every rank gets the same results
        with autocast:
            return greedy_eval(model, tokenizer, eval_prompts[rt.rank::rt.world_size], greedy, input_device, sources,
                               mb, functools.partial(all_reduce_sum, runtime=rt))

    first_eval = None
    if eval_prompts and start_step == 0:
        first_eval = evaluate()
        log_values(log, 0, total_steps, first_eval)
    model.train()
    train_seconds, tokens_seen, losses, rewards_seen = 0.0, 0, [], []
    stop, preempted, path = catch_stop_signals(), False, None  # SIGTERM / Ctrl-C: checkpoint, then exit
    for step in range(start_step + 1, total_steps + 1):
        t0 = time.perf_counter()
        group = [train_prompts[i] for i in next(stream) for _ in range(cfg.group_size)]  # each prompt G times
        with autocast:
            completions, texts = sample_completions(model, tokenizer, [p["ids"] for p in group], sampling, input_device)
            t1 = time.perf_counter()
            by_source = score_completions(sources.get("reward_fn"), sources.get("reward_model"),
                                          [p["text"] for p in group], texts, [p["record"] for p in group], mb)
        rewards = sum(by_source.values())
        advantages = group_advantages(rewards, cfg.group_size, cfg.scale_rewards)
        rows = [{"input_ids": p["ids"] + c, "labels": [-100] * len(p["ids"]) + c} for p, c in zip(group, completions)]
        micro = [(rows[i:i + mb], advantages[i:i + mb]) for i in range(0, len(rows), mb)]
        t2 = time.perf_counter()
        old, ref = frozen_logps(model, micro, cfg, pad_id, input_device, autocast)
        n_trained, n_tokens, n_rows = sum(map(len, completions)), sum(len(r["input_ids"]) for r in rows), len(rows)
        reward_sum, reward_sq = float(rewards.sum()), float((rewards ** 2).sum())
        source_sums = [float(v.sum()) for v in by_source.values()]
        n_trained, n_tokens, n_rows, reward_sum, reward_sq, *source_sums = all_reduce_sum(
            [n_trained, n_tokens, n_rows, reward_sum, reward_sq, *source_sums], rt)
        totals, updates = torch.zeros(3, dtype=torch.float64), 0
        for _ in range(cfg.updates_per_batch):
            sums = policy_update(train_model, micro, old, ref, n_trained, cfg, pad_id, input_device, rt, scaler,
                                 autocast)
            scaler.unscale_(optimizer)  # clip and report the true gradients
            trained_params = [p for p in model.parameters() if p.requires_grad]
            grad_norm = torch.nn.utils.clip_grad_norm_(trained_params, cfg.max_grad_norm)
            sums = torch.tensor(all_reduce_sum(sums.tolist(), rt), dtype=torch.float64)
            loss = float(sums[0]) / max(n_trained, 1)
            # checked before any update; with the fp16 scaler an overflow alone is the scaler's to skip
            if not is_finite(loss, grad_norm, scaler.is_enabled()):
                if cfg.on_nan == "stop":
                    raise non_finite_error(step, loss, grad_norm, out)
                optimizer.zero_grad(set_to_none=True)
                scaler.update()
                log.info(f"step {step}/{total_steps}: loss {loss}, gradient norm {float(grad_norm)}: the rest of "
                         "this batch's updates skipped (--on_nan=skip)")
                break
            scaler.step(optimizer)  # fp16: skips a step whose gradients overflowed, and update() lowers the scale
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            totals, updates = totals + sums, updates + 1
        scheduler.step()
        t3 = time.perf_counter()
        train_seconds, tokens_seen = train_seconds + t3 - t0, tokens_seen + int(n_tokens)
        log.advance()
        loss, kl, clip_fraction = (totals / max(n_trained * updates, 1)).tolist()  # per token, over the updates
        reward_mean = reward_sum / n_rows
        losses += [loss] if updates else []
        rewards_seen.append(reward_mean)
        if updates and (step % cfg.log_every == 0 or step == total_steps):
            per_source = {k: v / n_rows for k, v in zip(by_source, source_sums)} if len(by_source) > 1 else {}
            forwards = updates + (old is not None) + (ref is not None)  # tokens through the model in training
            log_values(log, step, total_steps, {
                "loss": loss, "reward": reward_mean, "reward_std": max(reward_sq / n_rows - reward_mean ** 2, 0) ** 0.5,
                **per_source, "kl": kl, "clip_fraction": clip_fraction, "completion_len": n_trained / n_rows,
                "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                "gen_tokens_per_s": n_trained / rt.world_size / (t1 - t0),
                "train_tokens_per_s": n_tokens * forwards / rt.world_size / (t3 - t2), **memory_gb(devices)})
        if eval_prompts and cfg.eval_every > 0 and step % cfg.eval_every == 0 and step != total_steps:
            log_values(log, step, total_steps, evaluate())
        preempted = stop_requested(stop, rt)
        if (cfg.save_every > 0 and step % cfg.save_every == 0 or preempted):  # all ranks call it; rank 0 writes
            save_adapter = functools.partial(model.save_pretrained, selected_adapters=["default"])
            path = save_checkpoint(out, step, save_adapter, optimizer, scheduler, cfg.keep_last, scaler)
            log.info(f"saved checkpoint {path}")
        if preempted:
            log.info(f"stopped by {stop.signal or 'a signal to another rank'} after step {step}: checkpoint {path}; "
                     "continue with --resume")
            break

    stop.restore()
    if preempted:
        log.close()
        cleanup(rt)
        return {"preempted": True, "losses": losses, "rewards": rewards_seen, "steps": step - start_step}

    # ---- save and final eval
    final_dir = out / "final"
    save_final(model, tokenizer, final_dir, rt)
    results = None
    if eval_prompts:
        results = evaluate()
        log_values(log, total_steps, total_steps, results)
        if rt.is_main:
            report = {"step": total_steps, "prompts": len(eval_prompts), **results, "at_start": first_eval}
            (out / "eval_results.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info(f"done: {total_steps - start_step} steps in {train_seconds:.1f}s, "
             f"{tokens_seen / max(train_seconds, 1e-9):,.0f} tok/s, peak mem {peak_memory_gb(devices):.2f} GB")
    log.close()
    cleanup(rt)
    return {"model": model, "losses": losses, "rewards": rewards_seen, "eval": results, "first_eval": first_eval,
            "final_dir": final_dir, "steps": total_steps - start_step}


if __name__ == "__main__":
    with exit_on_user_error():
        main(parse_config(Config))
