"""Using what the recipes trained: finding what an output folder holds, loading it to generate or score, rendering
prompts the way training did, and batched left-padded generation. Shared by tools/*.py.

    model_dir = resolve_model_path("tiny", option="model")             # 'tiny' or a local checkpoint folder
    head = head_info(adapter_dir)                                 # labels.json / reward_model.json, or None
    model = load_for_inference(model_dir, adapter_dir, num_labels=head["num_labels"])
    text, add_special = generation_prompt(record, tokenizer)      # what the model saw before its answer
    outputs = generate_texts(model, tokenizer, prompt_ids, batch_size=8, generation_config=config)
"""
import copy
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from common.config import UserError
from common.data import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    DataError,
    Record,
    chat_messages,
    collate_left_padded,
    encode_text,
    end_of_turn_ids,
    render_prompt_response,
    require_str,
    without_template_bos,
)
from common.layer_split import layer_split_device_map
from common.model import load_model, load_tokenizer, resolve_model_path

HEAD_FILES = ("labels.json", "reward_model.json")  # what the cls recipes write beside a classifier / reward model


def read_adapter_config(adapter_dir, option="adapter") -> dict:
    """adapter_config.json of a LoRA output folder (out/final); a clear error for a folder that is not one."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise UserError(f"--{option}={adapter_dir}: no such folder; expected a LoRA output folder such as out/final")
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        config_path = adapter_dir / "config.json"
        if config_path.is_file() and "model_type" in json.loads(config_path.read_text()):
            hint = "this is a whole model (a full fine-tune or a merged model): use it as --model directly"
        elif (adapter_dir / "final" / "adapter_config.json").is_file():
            hint = f"this is a run's output folder; the adapter is in --{option}={adapter_dir / 'final'}"
        else:
            hint = "expected the out/final folder of a LoRA recipe"
        raise UserError(f"--{option}={adapter_dir}: no adapter_config.json here; {hint}")
    return json.loads(path.read_text())


def resolve_model_and_adapter(model: str | None, adapter: str | None) -> tuple[Path, Path | None]:
    """The --model folder ('tiny' or a local checkpoint; by default the base the adapter's adapter_config.json names)
    and the --adapter folder, both checked."""
    adapter_config = read_adapter_config(adapter) if adapter else {}
    model = model or adapter_config.get("base_model_name_or_path")
    if not model:
        raise UserError("--model is needed (or an --adapter whose adapter_config.json names its base)")
    return resolve_model_path(model, option="model"), Path(adapter) if adapter else None


def head_info(folder) -> dict | None:
    """What a classifier or reward model folder says about its head: labels.json (task, labels, pooling, append_eos,
    text_field) or reward_model.json (pooling, append_eos, prompt_template), with 'file' and 'num_labels' added;
    None when the folder has neither (a causal LM)."""
    for name in HEAD_FILES:
        path = Path(folder) / name
        if path.is_file():
            info = json.loads(path.read_text())
            num_labels = len(info["labels"]) if "labels" in info else int(info.get("num_labels", 1))
            return {**info, "file": name, "num_labels": num_labels}
    return None


def quantization_method(model_dir) -> str | None:
    """'gptq', 'bitsandbytes', ... when the checkpoint's config.json says it is stored quantized, else None."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    quant = config.get("quantization_config")
    return (quant.get("quant_method") or "unknown") if quant else None


def tokenizer_dir(model_dir, adapter_dir=None) -> Path:
    """The adapter's tokenizer when it has one (the recipes save the tokenizer they trained with), else the model's."""
    if adapter_dir is not None and (Path(adapter_dir) / "tokenizer_config.json").is_file():
        return Path(adapter_dir)
    return Path(model_dir)


def make_safetensors_readable(folder):
    """safetensors creates its files with mode 0600 whatever the umask; give them the umask's mode like every other
    file, so a merged model or delta can be served or shared by another user."""
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(folder).glob("*.safetensors"):
        path.chmod(0o666 & ~umask)


def inference_device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def parse_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto': bf16 on a GPU, fp32 on CPU (CPU bf16 matmuls are slow and less exact); else the named dtype."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise UserError(f"--dtype={name}: expected auto, {', '.join(dtypes)}")
    return dtypes[name]


def import_gptqmodel_quietly():
    """peft imports gptqmodel (when installed) the first time it wraps a model, which prints a banner and changes
    HF_HOME and the root logger; importing it first through common.gptq keeps the process as it was."""
    try:
        from common.gptq import import_gptqmodel

        import_gptqmodel()
    except ImportError:
        pass


def load_for_inference(model_dir, adapter_dir=None, load_in_4bit=False, num_labels=None, dtype=torch.float32,
                       device=None, device_map="single", max_memory_per_gpu=""):
    """A model in eval mode: the checkpoint in model_dir (full precision, GPTQ as stored, or NF4-quantized on load
    with load_in_4bit), with the LoRA adapter in adapter_dir on top when given. num_labels: a sequence classifier with
    that many outputs (its score head comes from the adapter or the checkpoint); None: a causal LM. device_map
    'auto' spreads the layers over the visible GPUs (common.layer_split, capped by max_memory_per_gpu), planned on
    the meta device before any weight is read: a model that does not fit is a one-line error."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    device = device or torch.device("cpu")
    model_class = AutoModelForSequenceClassification if num_labels else AutoModelForCausalLM
    head = {"num_labels": num_labels} if num_labels else {}
    placement, max_memory = layer_split_device_map(device_map, max_memory_per_gpu, device, 1)
    method = quantization_method(model_dir)
    if method == "gptq":
        if load_in_4bit:
            raise UserError(f"{model_dir} is already GPTQ-quantized; drop --load_in_4bit")
        from common.gptq import load_gptq_model

        model = load_gptq_model(model_dir, model_class, dtype, placement, max_memory=max_memory, **head)
    else:
        if load_in_4bit and method:
            raise UserError(f"{model_dir} is already quantized ({method}); drop --load_in_4bit")
        model = load_model(model_dir, "nf4" if load_in_4bit else "none", dtype, placement, model_class=model_class,
                           max_memory=max_memory, **head)
    if adapter_dir is not None:
        from peft import PeftModel

        import_gptqmodel_quietly()
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    if placement is None and not load_in_4bit and method is None:
        model.to(device)
    return model.eval()


def add_model_arguments(parser):
    """The options of a tool that loads a trained model: --model, --adapter, --load_in_4bit, --dtype, and the
    recipes' --device_map / --max_memory_per_gpu."""
    parser.add_argument("--model",
                        help="a local model folder or 'tiny'; default: the base the --adapter was trained on")
    parser.add_argument("--adapter", help="a LoRA output folder (out/final) to put on --model")
    parser.add_argument("--load_in_4bit", action="store_true", help="quantize --model to NF4 on load (bitsandbytes)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="weights and compute; auto: bf16 on a GPU, fp32 on CPU")
    parser.add_argument("--device_map", default="single", choices=("single", "auto"),
                        help="auto: the layers split over all visible GPUs, for a model too big for one")
    parser.add_argument("--max_memory_per_gpu", default="",
                        help="auto: weights cap per GPU, 22GiB or 10GiB,22GiB (default: what is free)")


def load_from_args(args, num_labels=None):
    """(model, tokenizer, model_dir, adapter_dir) from add_model_arguments' options."""
    model_dir, adapter_dir = resolve_model_and_adapter(args.model, args.adapter)
    device = inference_device()
    tokenizer = load_inference_tokenizer(model_dir, adapter_dir)
    model = load_for_inference(model_dir, adapter_dir, args.load_in_4bit, num_labels, parse_dtype(args.dtype, device),
                               device, args.device_map, args.max_memory_per_gpu)
    return model, tokenizer, model_dir, adapter_dir


def load_inference_tokenizer(model_dir, adapter_dir=None):
    """The tokenizer, left-padded with a pad token (common.model.load_tokenizer), from tokenizer_dir."""
    return load_tokenizer(tokenizer_dir(model_dir, adapter_dir))


# ---------------------------------------------------------------------------------------------------------------
# Prompts: a record rendered as the text the sft recipes trained the model to answer.


def render_chat(tokenizer, messages, where) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: chat prompts need a tokenizer with a chat template; this tokenizer has none")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_messages(record: Record) -> list[dict]:
    """A chat record's messages up to the reply to generate: a final assistant message is the reference answer and
    is left out."""
    messages = record.data["messages"]
    last = messages[-1] if isinstance(messages, list) and messages else None
    if isinstance(last, dict) and last.get("role") == "assistant":
        messages = chat_messages(record)[:-1]  # checked as training checks it
        if not messages:
            raise DataError(f"{record.where}: field 'messages' holds only an assistant reply; nothing to answer")
        return messages
    if last is None:
        raise DataError(f"{record.where}: field 'messages' must be a non-empty list of {{role, content}}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise DataError(f"{record.where}: field 'messages[{i}]' must be an object with a role (system, user or "
                            "assistant) and string content")
    return messages


def generation_prompt(record: Record, tokenizer, prompt_template="alpaca") -> tuple[str, bool]:
    """The prompt text and whether the tokenizer must add its BOS, as the sft recipes built it in training:
    chat {"messages"}: the chat template with the generation prompt (a final assistant message left out);
    alpaca {"instruction", "input"?}: the Alpaca template, or the chat template with prompt_template="chat";
    {"input"} (of input/target data): as is, or in the chat template with prompt_template="chat";
    {"prompt"}: as is, always."""
    data = record.data
    if "messages" in data:
        return render_chat(tokenizer, prompt_messages(record), record.where), False
    if "instruction" in data:
        instruction = require_str(record, "instruction")
        extra = data.get("input", "")
        if not isinstance(extra, str):
            raise DataError(f"{record.where}: field 'input' must be a string, got {type(extra).__name__}")
        if prompt_template == "chat":
            user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
            return render_chat(tokenizer, [{"role": "user", "content": user}], record.where), False
        template = ALPACA_PROMPT if extra.strip() else ALPACA_PROMPT_NO_INPUT
        return template.format(instruction=instruction, input=extra), True
    if "prompt" in data:
        return require_str(record, "prompt"), True
    if "input" in data:
        text = require_str(record, "input", allow_empty=True)
        if prompt_template == "chat":
            return render_chat(tokenizer, [{"role": "user", "content": text}], record.where), False
        return text, True
    raise DataError(f"{record.where}: no prompt in fields {sorted(data)}; expected chat {{messages}}, alpaca "
                    "{instruction, input?}, {input} or {prompt}")


def reference_answer(record: Record) -> str | None:
    """The answer a record holds for its prompt (alpaca 'output', 'target', a final assistant message), or None."""
    data = record.data
    if "messages" in data:
        last = data["messages"][-1] if isinstance(data["messages"], list) and data["messages"] else {}
        return last.get("content") if isinstance(last, dict) and last.get("role") == "assistant" else None
    for field in ("output", "target"):
        if isinstance(data.get(field), str):
            return data[field]
    return None


def encode_prompt(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """Token ids of a prompt: BOS (when the tokenizer adds one) + text, never an EOS (the answer comes next)."""
    ids = list(tokenizer(text, add_special_tokens=add_special_tokens).input_ids)
    if ids and ids[-1] == tokenizer.eos_token_id and not text.endswith(tokenizer.eos_token or "\0"):
        ids = ids[:-1]  # tokenizers that append EOS would tell the model the prompt is over before it answered
    return ids


# ---------------------------------------------------------------------------------------------------------------
# Generation


def stop_token_ids(tokenizer, eos=None) -> list[int]:
    """The ids generation stops at: the checkpoint's eos (an id, a list or None), the tokenizer's EOS and the chat
    template's end-of-turn token (common.data.end_of_turn_ids), once each, in that order. A base checkpoint trained
    with a chat template learns to end its replies with the template's end-of-turn token (Llama 3 <|eot_id|>, ChatML
    <|im_end|>), which the base's eos alone (<|end_of_text|>, <|endoftext|>) never stops at."""
    ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    ids += [tokenizer.eos_token_id, *end_of_turn_ids(tokenizer)]
    return list(dict.fromkeys(i for i in ids if i is not None))


def make_generation_config(model, tokenizer, max_new_tokens: int, do_sample=False, temperature=1.0, top_p=1.0,
                           top_k=50):
    """The model's own generation config with these settings and eos_token_id = stop_token_ids (its eos, the
    tokenizer's, the chat template's end-of-turn); greedy unless do_sample, whatever the checkpoint's defaults say
    (some ship do_sample=True)."""
    config = copy.deepcopy(model.generation_config)
    config.max_new_tokens, config.max_length = max_new_tokens, None
    config.do_sample = do_sample
    config.temperature, config.top_p, config.top_k = (temperature, top_p, top_k) if do_sample else (None, None, None)
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = stop_token_ids(tokenizer, config.eos_token_id)
    return config


def save_generation_config(folder, model, tokenizer):
    """folder/generation_config.json for a trained model or adapter: the model's generation config (a fresh one if it
    has none) with eos_token_id = stop_token_ids and the tokenizer's pad (and bos when the config has none), so
    generate(), tools/generate.py, merge_lora.py and serving engines stop at the end of a reply."""
    from transformers import GenerationConfig

    config = copy.deepcopy(getattr(model, "generation_config", None)) or GenerationConfig()
    config.eos_token_id = stop_token_ids(tokenizer, config.eos_token_id)
    config.pad_token_id = tokenizer.pad_token_id
    if config.bos_token_id is None:
        config.bos_token_id = tokenizer.bos_token_id
    config.save_pretrained(folder)
    return config


def generate_texts(model, tokenizer, prompt_ids: list[list[int]], batch_size: int, generation_config,
                   on_batch=None) -> list[str]:
    """Generated continuations of every prompt (special tokens dropped), in the order of prompt_ids. Prompts are
    batched by length (longest first, so an out-of-memory shows at once) and left-padded: pads get attention 0 and
    generate numbers positions from the mask, so a row's output does not depend on its batch mates."""
    device = model.get_input_embeddings().weight.device  # the first GPU of a layer split
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    outputs = [""] * len(prompt_ids)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = collate_left_padded([{"input_ids": prompt_ids[i]} for i in rows], tokenizer.pad_token_id)
        with torch.no_grad():
            generated = model.generate(input_ids=batch["input_ids"].to(device),
                                       attention_mask=batch["attention_mask"].to(device),
                                       generation_config=generation_config)
        new_tokens = generated[:, batch["input_ids"].shape[1]:].cpu()
        for row, i in enumerate(rows):
            outputs[i] = tokenizer.decode(new_tokens[row], skip_special_tokens=True)
        if on_batch:
            on_batch(min(start + batch_size, len(order)), len(order))
    return outputs


# ---------------------------------------------------------------------------------------------------------------
# Rewards for reinforcement learning (rlhf/grpo-qlora): a Python function from a file the user names, and a reward
# model that cls/reward-qlora trained.


def load_reward_function(spec: str, option: str = "reward_fn"):
    """The function of --reward_fn=path.py:name (path.py alone: its `score`), the file run as a module of its own.
    A missing file, a file that fails to import or a missing function is one line naming the option."""
    import importlib.util

    path, sep, name = spec.rpartition(":")
    if not sep or not name.isidentifier():
        path, name = spec, "score"
    file = Path(path)
    if not file.is_file() or file.suffix != ".py":
        raise UserError(f"--{option}={spec}: no such Python file {file}; expected path/to/rewards.py:function")
    module_spec = importlib.util.spec_from_file_location(f"reward_fn_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the user's code: any error is reported as one line, not a traceback into the recipe
        raise UserError(f"--{option}={spec}: importing {file} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise UserError(f"--{option}={spec}: {file} has no function {name!r}; expected one of "
                        f"{', '.join(found) or 'none found'}, called as {name}(prompts, completions, records)")
    return fn


def call_reward_function(fn, prompts: list[str], completions: list[str], records: list[dict],
                         option: str = "reward_fn") -> list[float]:
    """fn(prompts, completions, records), checked: one finite number (int or float, not bool) per completion."""
    import numbers

    values = fn(prompts, completions, records)
    name = getattr(fn, "__name__", "the reward function")
    try:
        values = list(values)
    except TypeError:
        raise UserError(f"--{option}: {name} returned {type(values).__name__}; expected a list of one number per "
                        "completion") from None
    if len(values) != len(completions):
        raise UserError(f"--{option}: {name} returned {len(values)} values for {len(completions)} completions; "
                        "expected one number per completion")
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise UserError(f"--{option}: {name} returned {value!r} for completion {i}; expected a finite number")
    return [float(v) for v in values]


@dataclass
class RewardModel:
    """A reward model loaded for scoring: the PooledClassifier, its own tokenizer, reward_model.json's settings."""
    model: torch.nn.Module
    tokenizer: object
    info: dict
    device: torch.device


def load_reward_model(folder, device: torch.device, dtype=torch.float32, option: str = "reward_model") -> RewardModel:
    """The reward model in a cls/reward-qlora out/final folder (adapter + score head, reward_model.json), on the base
    its adapter_config.json names quantized to NF4 as it trained, frozen, in eval mode."""
    from common.model import PooledClassifier

    adapter_config = read_adapter_config(folder, option)
    info = head_info(folder)
    if info is None or info["file"] != "reward_model.json":
        raise UserError(f"--{option}={folder}: no reward_model.json there; expected the out/final folder of "
                        "cls/reward-qlora")
    base = adapter_config.get("base_model_name_or_path") or ""
    model_dir = resolve_model_path(base, option=option)
    model = load_for_inference(model_dir, folder, load_in_4bit=True, num_labels=1, dtype=dtype, device=device)
    model.requires_grad_(False)
    tokenizer = load_inference_tokenizer(model_dir, folder)
    return RewardModel(PooledClassifier(model, info.get("pooling", "last")).eval(), tokenizer, info, device)


def reward_model_request(record: Record) -> str | list[dict]:
    """The user's request in a record, as cls/reward-qlora's pairs hold it: "prompt", instruction + "\\n\\n" + input,
    "input", or a chat record's messages before the reply (a list)."""
    data = record.data
    if "messages" in data:
        return prompt_messages(record)
    if "instruction" in data:
        instruction, extra = require_str(record, "instruction"), data.get("input") or ""
        return f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() else instruction
    if "prompt" in data:
        return require_str(record, "prompt")
    if "input" in data:
        return require_str(record, "input", allow_empty=True)
    raise DataError(f"{record.where}: no prompt in fields {sorted(data)}; expected chat {{messages}}, alpaca "
                    "{instruction, input?}, {input} or {prompt}")


def reward_model_text(tokenizer, request: str | list[dict], completion: str, prompt_template: str) -> str:
    """request + completion as the text the reward model scores, rendered as cls/reward-qlora rendered its pairs
    (common.data.render_prompt_response); a conversation goes whole through the chat template (its contents joined
    into one prompt for an Alpaca reward model)."""
    if isinstance(request, str):
        return render_prompt_response(tokenizer, request, completion, prompt_template)
    if len(request) == 1 and request[0]["role"] == "user" or prompt_template != "chat":
        prompt = "\n\n".join(m["content"] for m in request)
        return render_prompt_response(tokenizer, prompt, completion, prompt_template)
    messages = [*request, {"role": "assistant", "content": completion}]
    return without_template_bos(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False))


def reward_model_scores(reward_model: RewardModel, records: list[Record], completions: list[str], batch_size: int,
                        max_seq_len: int = 1024) -> list[float]:
    """The reward model's score of each (record's request, completion), in left-padded batches, read where it was
    trained to be read (reward_model.json: pooling, EOS appended, prompt template)."""
    info, tokenizer = reward_model.info, reward_model.tokenizer
    texts = [reward_model_text(tokenizer, reward_model_request(r), c, info.get("prompt_template", "alpaca"))
             for r, c in zip(records, completions, strict=True)]
    ids = [encode_text(tokenizer, t, max_seq_len, info.get("append_eos", True))[0] for t in texts]
    scores = []
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            rows = [{"input_ids": i} for i in ids[start:start + batch_size]]
            batch = collate_left_padded(rows, tokenizer.pad_token_id)
            batch = {k: v.to(reward_model.device) for k, v in batch.items()}
            scores += reward_model.model(**batch).squeeze(-1).float().tolist()
    return scores


def score_completions(reward_fn, reward_model: RewardModel | None, prompts: list[str], completions: list[str],
                      records: list[Record], batch_size: int) -> dict[str, torch.Tensor]:
    """The rewards of each completion from each source given, {"reward_fn": ..., "reward_model": ...} (float64
    tensors): the function gets the prompt texts, the completions and the records' data; the reward model scores
    the records' requests with the completions."""
    rewards = {}
    if reward_fn is not None:
        rewards["reward_fn"] = call_reward_function(reward_fn, prompts, completions, [r.data for r in records])
    if reward_model is not None:
        rewards["reward_model"] = reward_model_scores(reward_model, records, completions, batch_size)
    return {name: torch.tensor(values, dtype=torch.float64) for name, values in rewards.items()}


def sampling_prompts(records: list[Record], tokenizer, prompt_template: str, max_prompt_len: int) -> list[dict]:
    """Records as prompts to sample answers to, {ids, text, record}: rendered and tokenized as the sft recipes train
    (generation_prompt, encode_prompt), cut from the left to max_prompt_len (a BOS kept), and the record with its
    reference answer under "answer" (its own "answer", else reference_answer; None when it has none)."""
    prompts = []
    for record in records:
        text, add_special = generation_prompt(record, tokenizer, prompt_template)
        ids = encode_prompt(tokenizer, text, add_special)
        keep_first = 1 if ids and ids[0] == tokenizer.bos_token_id else 0
        ids = ids[:keep_first] + ids[max(keep_first, len(ids) - max_prompt_len + keep_first):]
        own = record.data.get("answer")
        answer = own if isinstance(own, str) else reference_answer(record)
        prompts.append({"ids": ids, "text": text, "add_special": add_special,
                        "record": Record({**record.data, "answer": answer}, record.where)})
    return prompts


def sample_completions(model, tokenizer, prompt_ids: list[list[int]], generation_config,
                       device) -> tuple[list[list[int]], list[str]]:
    """One left-padded generate call with the KV cache over all prompts, the model in eval mode meanwhile (then
    train mode again): each completion's token ids up to and including its first stop token, and its text (special
    tokens dropped, as generate_texts decodes)."""
    batch = collate_left_padded([{"input_ids": ids} for ids in prompt_ids], tokenizer.pad_token_id)
    generation_config.use_cache = True  # the KV cache: each new token attends to the cached keys and values
    model.eval()
    with torch.no_grad():
        generated = model.generate(input_ids=batch["input_ids"].to(device), generation_config=generation_config,
                                   attention_mask=batch["attention_mask"].to(device))
    model.train()
    stops, completions = set(generation_config.eos_token_id), []
    for row in generated[:, batch["input_ids"].shape[1]:].tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
        completions.append(row[:end])
    return completions, [tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]


def greedy_eval(model, tokenizer, prompts: list[dict], generation_config, device, sources: dict, batch_size: int,
                sum_over_ranks=None) -> dict:
    """Greedy completions of `prompts` (sampling_prompts' dicts; under data parallelism each rank's share) scored:
    eval_reward (the sources added up; each source's mean too when there are several) and, over the records with a
    reference answer, eval_exact_match (stripped completion == stripped answer, as tools/evaluate.py compares).
    sources: {"reward_fn": fn, "reward_model": RewardModel}, either or both; sum_over_ranks(list) -> list adds the
    counts over ranks (common.runtime.all_reduce_sum), so every rank returns the same numbers."""
    sums = [0.0] * (5 + len(sources))  # prompts, with an answer, exact matches, answer loss and tokens, each source
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        loss_sum, n_tokens = answer_loss_sum(model, tokenizer, batch, device)
        _, texts = sample_completions(model, tokenizer, [p["ids"] for p in batch], generation_config, device)
        rewards = score_completions(sources.get("reward_fn"), sources.get("reward_model"), [p["text"] for p in batch],
                                    texts, [p["record"] for p in batch], batch_size)
        answers = [p["record"].data["answer"] for p in batch]
        exact = sum(a is not None and t.strip() == a.strip() for t, a in zip(texts, answers, strict=True))
        counts = [len(batch), sum(a is not None for a in answers), exact, loss_sum, n_tokens,
                  *(float(v.sum()) for v in rewards.values())]
        sums = [s + c for s, c in zip(sums, counts, strict=True)]
    n_prompts, n_answered, n_exact, loss_sum, n_tokens, *reward_sums = sum_over_ranks(sums) if sum_over_ranks else sums
    results = {"eval_loss": loss_sum / n_tokens} if n_tokens else {}
    results["eval_reward"] = sum(reward_sums) / max(n_prompts, 1)
    if len(sources) > 1:
        results.update({f"eval_{name}": value / max(n_prompts, 1) for name, value in zip(sources, reward_sums)})
    return {**results, "eval_exact_match": n_exact / n_answered} if n_answered else results


def answer_loss_sum(model, tokenizer, prompts: list[dict], device) -> tuple[float, int]:
    """The summed next-token loss of the reference answers (+ EOS) after their prompts, and how many answer tokens,
    over the prompts (sampling_prompts' dicts) that have one; the model in eval mode meanwhile."""
    from common.data import IGNORE_INDEX
    from common.losses import token_loss_sum

    rows = []
    for p in (p for p in prompts if p["record"].data["answer"] is not None):
        # tokenized after its prompt, as the sft recipes tokenize it (a word's first piece differs after a newline)
        whole = encode_prompt(tokenizer, p["text"] + p["record"].data["answer"], p["add_special"])
        prompt = encode_prompt(tokenizer, p["text"], p["add_special"])
        answer = whole[len(prompt):] if whole[:len(prompt)] == prompt else list(tokenizer(
            p["record"].data["answer"], add_special_tokens=False).input_ids)
        answer.append(tokenizer.eos_token_id)
        rows.append({"input_ids": p["ids"] + answer, "labels": [IGNORE_INDEX] * len(p["ids"]) + answer})
    if not rows:
        return 0.0, 0
    batch = collate_left_padded(rows, tokenizer.pad_token_id)
    labels = batch.pop("labels")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).logits
    model.train(was_training)
    return float(token_loss_sum(logits, labels.to(logits.device))), int((labels[:, 1:] != IGNORE_INDEX).sum())


def prompts_report(files: dict, max_prompt_len: int) -> list[str]:
    """A recipe's start-up lines for sampling prompts, {name: (path, prompts)}: counts, lengths, how many have a
    reference answer or were cut, and the first training prompt as rendered."""
    from common.data import length_summary

    lines = [f"data     {name} {path}: {len(prompts):,} prompts, "
             f"{sum(p['record'].data['answer'] is not None for p in prompts):,} with a reference answer | "
             f"{length_summary([{'input_ids': p['ids']} for p in prompts])} | "
             f"{sum(len(p['ids']) == max_prompt_len for p in prompts)} cut to max_prompt_len"
             for name, (path, prompts) in files.items() if prompts]
    return [*lines, f"prompt   {next(iter(files.values()))[1][0]['text']!r}"]
