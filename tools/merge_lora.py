"""Merge a LoRA adapter (a recipe's out/final) into its base model: one ordinary Hugging Face checkpoint in
safetensors that loads with from_pretrained, needs no peft, and serves from vLLM / TGI / llama.cpp converters.

    python tools/merge_lora.py --base=/models/Llama-2-7b-hf --adapter=sft/qlora/out/final --out=/models/llama2-7b-sft
    python tools/merge_lora.py --base=tiny --adapter=cls/qlora/out/final --out=/tmp/tiny-cls     # the tiny test Llama

Causal LM adapters (sft/*) give a *ForCausalLM; sequence-classification adapters (cls/qlora, cls/peft-int4,
cls/reward-qlora; task_type SEQ_CLS) give a *ForSequenceClassification with the trained score head, and their
labels.json / reward_model.json is copied beside it. The tokenizer comes from the adapter folder (the one it trained
with).

4-bit bases: an adapter trained with QLoRA (NF4) or on a GPTQ int4 checkpoint (sft/peft-int4, cls/peft-int4) is
merged onto the full-precision model given by --base, never into 4-bit weights (rounding them again would undo most
of the update). --base must therefore be the original fp16/bf16/fp32 checkpoint; a quantized one is refused.
The merged weights are saved in --dtype (default: the base's own). --out is written atomically (a temporary folder,
then one rename) and replaced when it holds an earlier merge.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a standalone script: make `common` importable
from common.checkpoint import atomic_write_dir  # noqa: E402
from common.config import UserError, exit_on_user_error  # noqa: E402
from common.inference import (  # noqa: E402
    head_info,
    import_gptqmodel_quietly,
    load_inference_tokenizer,
    make_safetensors_readable,
    quantization_method,
    read_adapter_config,
    save_generation_config,
)
from common.logs import quiet_third_party_logs  # noqa: E402
from common.model import resolve_model_path  # noqa: E402

DTYPES = ("auto", "float32", "bfloat16", "float16")
# fields that must agree between the base the adapter was trained on and the --base it is merged onto
ARCHITECTURE_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "vocab_size")


def check_output_folder(out: Path, *inputs: Path):
    """--out is replaced whole, so it must be new or an earlier model folder, and none of the inputs."""
    for given in inputs:
        if given is not None and out.resolve() == Path(given).resolve():
            raise UserError(f"--out={out} is one of the inputs; choose a new folder")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file())):
        raise UserError(f"--out={out} exists and is not a model folder; choose a new folder (it would be replaced)")


def training_run_quantization(adapter_dir: Path) -> str | None:
    """The --quantization a LoRA recipe ran with ('nf4', 'int8'), from the run's config.json beside final/ (or two
    levels up for checkpoints/step_N); None when unknown or 'none'."""
    for run_dir in (adapter_dir.parent, adapter_dir.parent.parent):
        path = run_dir / "config.json"
        if path.is_file():
            run_config = json.loads(path.read_text())
            if "quantization" in run_config:
                return run_config["quantization"] if run_config["quantization"] != "none" else None
    return None


def trained_base_note(adapter_dir: Path, trained_on: str) -> str | None:
    """A line for the user when the adapter was trained on a quantized base (and is merged onto full precision)."""
    trained_path = Path(trained_on)
    if (trained_path / "config.json").is_file() and quantization_method(trained_path) == "gptq":
        return f"the adapter was trained on the GPTQ int4 checkpoint {trained_on}"
    quantization = training_run_quantization(adapter_dir)
    if quantization:
        name = {"nf4": "NF4 4-bit", "int8": "8-bit"}.get(quantization, quantization)
        return f"the adapter was trained on the {name} (bitsandbytes) quantization of {trained_on}"
    return None


def check_same_architecture(base_dir: Path, trained_on: str):
    """When the folder the adapter was trained on exists here, its architecture must be --base's (a GPTQ folder
    keeps the config of the model it was quantized from)."""
    trained_config_path = Path(trained_on) / "config.json"
    if not trained_config_path.is_file():
        return
    trained, base = json.loads(trained_config_path.read_text()), json.loads((base_dir / "config.json").read_text())
    differ = [f"{f} {trained.get(f)} vs {base.get(f)}" for f in ARCHITECTURE_FIELDS if trained.get(f) != base.get(f)]
    if differ:
        raise UserError(f"--base={base_dir} is not the model the adapter was trained on ({trained_on}): "
                        f"{', '.join(differ)}")


def merge_lora(base: str, adapter: str, out: str, dtype: str = "auto") -> dict:
    """Load --base (full precision), put the adapter on it, fold the LoRA products into the weights and save the
    result with the adapter's tokenizer (and head file) to out, atomically. Returns what was done."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from common.model import load_model

    adapter_dir, out_dir = Path(adapter), Path(out)
    adapter_config = read_adapter_config(adapter_dir)
    if adapter_config.get("peft_type") != "LORA":
        raise UserError(f"--adapter={adapter}: a {adapter_config.get('peft_type')} adapter; only LoRA merges into "
                        "the weights")
    if dtype not in DTYPES:
        raise UserError(f"--dtype={dtype}: expected one of {', '.join(DTYPES)}")
    base_dir = resolve_model_path(base, option="base")
    method = quantization_method(base_dir)
    if method:
        raise UserError(f"--base={base}: a {method}-quantized checkpoint; merging needs the full-precision model "
                        "(pass the fp16/bf16/fp32 checkpoint it was quantized from; an adapter trained on a 4-bit "
                        "base merges onto that)")
    check_output_folder(out_dir, base_dir, adapter_dir)
    trained_on = adapter_config.get("base_model_name_or_path") or ""
    check_same_architecture(base_dir, trained_on)
    note = trained_base_note(adapter_dir, trained_on)

    sequence_classification = adapter_config.get("task_type") == "SEQ_CLS"
    head = head_info(adapter_dir) if sequence_classification else None
    head_kwargs = {}
    if sequence_classification:
        if head is None:
            raise UserError(f"--adapter={adapter}: a sequence-classification adapter without labels.json or "
                            "reward_model.json; cannot tell how many outputs its score head has")
        names = head.get("labels") or ["score"]
        head_kwargs = {"num_labels": head["num_labels"], "id2label": dict(enumerate(names)),
                       "label2id": {n: i for i, n in enumerate(names)}}
    model_class = AutoModelForSequenceClassification if sequence_classification else AutoModelForCausalLM
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)  # auto: as the base checkpoint stores it
    model = load_model(base_dir, "none", torch_dtype, model_class=model_class, **head_kwargs)
    tokenizer = load_inference_tokenizer(base_dir, adapter_dir)
    import_gptqmodel_quietly()
    try:
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except RuntimeError as e:  # size mismatches: an adapter for another architecture or vocabulary
        raise UserError(f"--adapter={adapter} does not fit --base={base}: {str(e).strip().splitlines()[-1]}") from None
    merged = model.merge_and_unload(safe_merge=True)  # safe_merge: refuse NaNs instead of writing them
    merged.config.pad_token_id = tokenizer.pad_token_id

    def write(folder: Path):
        merged.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        if head is not None:
            shutil.copy(adapter_dir / head["file"], folder / head["file"])
        else:  # a causal LM: eos and the end-of-turn token of the chat template the adapter trained with
            save_generation_config(folder, merged, tokenizer)
        make_safetensors_readable(folder)

    atomic_write_dir(out_dir, write)
    n_params = sum(p.numel() for p in merged.parameters())
    return {"out": out_dir, "base": base_dir, "note": note, "head": head, "task": adapter_config.get("task_type"),
            "r": adapter_config.get("r"), "dtype": str(next(merged.parameters()).dtype).replace("torch.", ""),
            "parameters": n_params}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the full-precision base model folder, or 'tiny' (the test Llama)")
    p.add_argument("--adapter", required=True, help="the LoRA output folder (out/final)")
    p.add_argument("--out", required=True, help="where the merged model goes (a new folder, or an earlier merge)")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="dtype of the merged weights (auto: the base's)")
    args = p.parse_args(argv)
    quiet_third_party_logs()
    with exit_on_user_error():
        result = merge_lora(args.base, args.adapter, args.out, args.dtype)
    if result["note"]:
        print(f"{result['note']}; merged onto the full-precision --base {result['base']} instead of 4-bit weights")
    head = f" with its {result['head']['file']}" if result["head"] else ""
    print(f"merged LoRA r={result['r']} ({result['task']}) from {args.adapter} into {result['base']}: "
          f"{result['parameters']:,} parameters, {result['dtype']}{head} -> {result['out']}")
    tool = "evaluate.py --data=eval.jsonl" if result["head"] else "generate.py --prompts=prompts.jsonl --out=out.jsonl"
    print(f"use it: python {Path(__file__).parent / tool.split()[0]} --model={Path(result['out']).resolve()} "
          f"{' '.join(tool.split()[1:])}")


if __name__ == "__main__":
    main()
