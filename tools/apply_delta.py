"""Weight deltas: share a fine-tune of a base you may not redistribute as target - base, and rebuild it from the base.

    python tools/apply_delta.py make  --base=/models/Llama-2-7b-hf --target=/models/llama2-7b-sft --out=/shared/delta
    python tools/apply_delta.py apply --base=/models/Llama-2-7b-hf --delta=/shared/delta --out=/models/llama2-7b-sft
    python tools/apply_delta.py make --base=tiny --target=/tmp/tiny-merged --out=/tmp/tiny-delta    # the tiny Llama

Both models are local Hugging Face checkpoints in safetensors (a full fine-tune's out/final, or tools/merge_lora.py's
output) with the same architecture; the target may have a larger vocabulary (its extra embedding / LM-head rows are
stored whole). The delta folder holds delta.json (what each tensor is, and the sha256 of every safetensors file of
the base), one delta-<shard> file per target shard, and the target's other files (config, tokenizer, labels.json)
under target/. `apply` refuses a base whose files do not hash as recorded, and rebuilds every tensor bit for bit:

  target = (base + delta), added in fp32 and saved in the target's dtype. Each tensor's delta is stored in the
  narrowest dtype that gives the target back exactly with that sum (the target's own dtype, then fp32; an fp32 target
  may need an fp64 delta, added in fp64); tensors the fine-tune left unchanged are not stored; a tensor the base lacks,
  or that no delta reproduces (NaN, say), is stored whole.

Outputs are written atomically (a temporary folder, then one rename).
"""
import argparse
import contextlib
import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a standalone script: make `common` importable
from common.checkpoint import atomic_write_dir  # noqa: E402
from common.config import UserError, exit_on_user_error  # noqa: E402
from common.inference import make_safetensors_readable, quantization_method  # noqa: E402
from common.model import resolve_model_path  # noqa: E402

DELTA_FORMAT = "llama-train-recipes weight delta v1"
MANIFEST = "delta.json"
TARGET_FILES = "target"  # subfolder with the target's non-weight files
# what must agree between base and target (vocab_size may grow)
ARCHITECTURE_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "head_dim", "tie_word_embeddings")
BITS_AS_INT = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
               torch.float16: torch.int16}


# ---------------------------------------------------------------------------------------------------------------
# Files and configs


def weight_files(model_dir: Path, option: str) -> list[Path]:
    if quantization_method(model_dir):
        raise UserError(f"--{option}={model_dir}: a {quantization_method(model_dir)}-quantized checkpoint; deltas are "
                        "between full-precision checkpoints")
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"--{option}={model_dir}: no *.safetensors files; re-save the model with save_pretrained "
                        "(safetensors is the default) first")
    return files


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def architecture(config: dict) -> dict:
    return {field: config.get(field) for field in ARCHITECTURE_FIELDS + ("vocab_size",)}


def check_compatible(base_config: dict, target_config: dict, base_name: str, target_name: str):
    differ = [f"{f} {base_config.get(f)} vs {target_config.get(f)}" for f in ARCHITECTURE_FIELDS
              if base_config.get(f) != target_config.get(f)]
    if differ:
        raise UserError(f"{base_name} and {target_name} have different architectures ({', '.join(differ)}); a delta "
                        "is between a model and its fine-tune")
    if (target_config.get("vocab_size") or 0) < (base_config.get("vocab_size") or 0):
        raise UserError(f"{target_name} has a smaller vocabulary than {base_name} ({target_config.get('vocab_size')} "
                        f"vs {base_config.get('vocab_size')}); only grown vocabularies are supported")


def read_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def check_output_folder(out: Path, *inputs: Path):
    """--out is replaced whole: it must be new or an earlier output of this tool, and none of the inputs."""
    for given in inputs:
        if out.resolve() == Path(given).resolve():
            raise UserError(f"--out={out} is one of the inputs; choose a new folder")
    earlier = (out / "config.json").is_file() or (out / MANIFEST).is_file()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not earlier)):
        raise UserError(f"--out={out} exists and is not a model or delta folder; choose a new folder (it would be "
                        "replaced)")


@contextlib.contextmanager
def open_tensors(files: list[Path]):
    """{tensor name: (open safetensors file, name)} over all shards, read lazily one tensor at a time."""
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        index = {}
        for path in files:
            handle = stack.enter_context(safe_open(str(path), framework="pt"))
            names = handle.keys()  # a safetensors file handle, no dict: its tensor names come from keys()
            for name in names:
                index[name] = handle
        yield index


# ---------------------------------------------------------------------------------------------------------------
# The arithmetic: the same rebuild in make (to check) and apply (to build)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (0.0 vs -0.0 differ, NaN equals the same NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype in BITS_AS_INT:
        return torch.equal(a.view(BITS_AS_INT[a.dtype]), b.view(BITS_AS_INT[b.dtype]))
    return torch.equal(a, b)


def rebuild(base: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """base + delta, added in fp32 (fp64 for an fp64 delta), in the target's dtype."""
    compute = torch.float64 if delta.dtype == torch.float64 else torch.float32
    return (base.to(compute) + delta.to(compute)).to(dtype)


def exact_delta(base: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """target - base in the narrowest dtype that rebuild() turns back into the target bit for bit, or None."""
    candidates = [target.dtype] if target.dtype in (torch.bfloat16, torch.float16) else []
    for dtype in candidates + [torch.float32, torch.float64]:
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        delta = (target.to(compute) - base.to(compute)).to(dtype)
        if same_bits(rebuild(base, delta, target.dtype), target):
            return delta
    return None


def grown_rows(name: str, base_shape, target_shape, base_vocab, target_vocab) -> bool:
    """An embedding or LM-head matrix whose rows grew with the vocabulary (same width)."""
    return (len(base_shape) == 2 and base_shape[0] == base_vocab and target_shape[0] == target_vocab
            and target_vocab > base_vocab and base_shape[1] == target_shape[1])


# ---------------------------------------------------------------------------------------------------------------
# make and apply


def make_delta(base: str, target: str, out: str) -> dict:
    """Write the delta of target against base to out (atomically). Returns counts by kind and the sizes."""
    base_dir, target_dir, out_dir = resolve_model_path(base, option="base"), Path(target), Path(out)
    if not (target_dir / "config.json").is_file():
        raise UserError(f"--target={target}: no config.json; expected a Hugging Face model folder")
    base_files, target_files = weight_files(base_dir, "base"), weight_files(target_dir, "target")
    base_config, target_config = read_config(base_dir), read_config(target_dir)
    check_compatible(base_config, target_config, f"--base={base}", f"--target={target}")
    check_output_folder(out_dir, base_dir, target_dir)
    base_vocab, target_vocab = base_config.get("vocab_size"), target_config.get("vocab_size")
    print(f"hashing the base's {len(base_files)} safetensors file(s)", file=sys.stderr, flush=True)
    manifest = {"format": DELTA_FORMAT, "base_files": {p.name: sha256_file(p) for p in base_files},
                "base_architecture": architecture(base_config), "shards": {}, "tensors": {}}
    counts = {"same": 0, "delta": 0, "grown": 0, "whole": 0}

    def write(folder: Path):
        from safetensors import safe_open
        from safetensors.torch import save_file

        with open_tensors(base_files) as base_tensors:
            for shard in target_files:
                stored = {}
                with safe_open(str(shard), framework="pt") as target_shard:
                    names = target_shard.keys()  # a safetensors file handle, no dict
                    for name in names:
                        t = target_shard.get_tensor(name)
                        entry = {"shard": shard.name, "dtype": str(t.dtype).replace("torch.", "")}
                        b = base_tensors[name].get_tensor(name) if name in base_tensors else None
                        if b is not None and t.is_floating_point() and b.shape != t.shape:
                            if not grown_rows(name, b.shape, t.shape, base_vocab, target_vocab):
                                raise UserError(f"tensor {name}: shape {tuple(t.shape)} in the target, "
                                                f"{tuple(b.shape)} in the base; only embedding / LM-head rows may grow")
                            delta = exact_delta(b, t[:b.shape[0]])
                            if delta is not None:  # the old rows as a delta, the new rows whole
                                entry.update(kind="grown", base_rows=b.shape[0])
                                stored[name], stored[name + ".extra_rows"] = delta, t[b.shape[0]:].contiguous()
                            else:
                                entry["kind"], stored[name] = "whole", t
                        elif b is not None and t.is_floating_point() and same_bits(b.to(t.dtype), t):
                            entry["kind"] = "same"  # unchanged by the fine-tune: nothing to store
                        elif b is not None and t.is_floating_point() and (delta := exact_delta(b, t)) is not None:
                            entry["kind"], stored[name] = "delta", delta
                        else:  # new in the target (a score head), not floating point, or no exact delta
                            entry["kind"], stored[name] = "whole", t
                        manifest["tensors"][name] = entry
                        counts[entry["kind"]] += 1
                delta_name = f"delta-{shard.name}"
                save_file(stored, str(folder / delta_name), metadata={"format": "pt"})
                manifest["shards"][shard.name] = delta_name
        (folder / TARGET_FILES).mkdir()
        for path in sorted(target_dir.iterdir()):  # config, generation config, tokenizer, labels.json, index
            if path.is_file() and not path.name.endswith(".safetensors") and not path.name.startswith("."):
                shutil.copy(path, folder / TARGET_FILES / path.name)
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        make_safetensors_readable(folder)

    atomic_write_dir(out_dir, write)
    delta_bytes = sum(p.stat().st_size for p in out_dir.glob("delta-*.safetensors"))
    target_bytes = sum(p.stat().st_size for p in target_files)
    return {"out": out_dir, "counts": counts, "delta_bytes": delta_bytes, "target_bytes": target_bytes}


def apply_delta(base: str, delta: str, out: str) -> dict:
    """Rebuild the target from base + the delta folder into out (atomically), after checking the base's hashes."""
    base_dir, delta_dir, out_dir = resolve_model_path(base, option="base"), Path(delta), Path(out)
    if not (delta_dir / MANIFEST).is_file():
        raise UserError(f"--delta={delta}: no {MANIFEST} here; expected a folder written by apply_delta.py make")
    manifest = json.loads((delta_dir / MANIFEST).read_text())
    if manifest.get("format") != DELTA_FORMAT:
        raise UserError(f"--delta={delta}: {MANIFEST} is {manifest.get('format')!r}, not {DELTA_FORMAT!r}")
    base_files = weight_files(base_dir, "base")
    expected = manifest["base_files"]
    if sorted(p.name for p in base_files) != sorted(expected):
        raise UserError(f"--base={base} is not the model this delta was made from: its safetensors files are "
                        f"{sorted(p.name for p in base_files)}, the delta's base had {sorted(expected)}")
    print(f"checking the base's {len(base_files)} safetensors file(s) against the delta", file=sys.stderr, flush=True)
    for path in base_files:
        digest = sha256_file(path)
        if digest != expected[path.name]:
            raise UserError(f"--base={base} is not the model this delta was made from: {path.name} has sha256 "
                            f"{digest[:16]}..., the delta expects {expected[path.name][:16]}... (another model, "
                            "revision or dtype; the delta only rebuilds the target from the exact base)")
    if architecture(read_config(base_dir)) != manifest["base_architecture"]:
        raise UserError(f"--base={base}: config.json differs from the delta's base (same weights, other config)")
    check_output_folder(out_dir, base_dir, delta_dir)

    def write(folder: Path):
        from safetensors import safe_open
        from safetensors.torch import save_file

        with open_tensors(base_files) as base_tensors:
            for shard, delta_name in manifest["shards"].items():
                rebuilt = {}
                with safe_open(str(delta_dir / delta_name), framework="pt") as stored:
                    for name, entry in manifest["tensors"].items():
                        if entry["shard"] != shard:
                            continue
                        dtype = getattr(torch, entry["dtype"])
                        kind = entry["kind"]
                        if kind == "whole":
                            rebuilt[name] = stored.get_tensor(name)
                        elif kind == "same":
                            rebuilt[name] = base_tensors[name].get_tensor(name).to(dtype)
                        elif kind == "delta":
                            rebuilt[name] = rebuild(base_tensors[name].get_tensor(name), stored.get_tensor(name), dtype)
                        elif kind == "grown":
                            old = rebuild(base_tensors[name].get_tensor(name), stored.get_tensor(name), dtype)
                            rebuilt[name] = torch.cat([old, stored.get_tensor(name + ".extra_rows")])
                        else:
                            raise UserError(f"--delta={delta}: tensor {name} has unknown kind {kind!r}")
                save_file(rebuilt, str(folder / shard), metadata={"format": "pt"})
        for path in sorted((delta_dir / TARGET_FILES).iterdir()):
            shutil.copy(path, folder / path.name)
        make_safetensors_readable(folder)

    atomic_write_dir(out_dir, write)
    return {"out": out_dir, "tensors": len(manifest["tensors"]), "shards": len(manifest["shards"])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make", help="delta = target - base")
    make.add_argument("--base", required=True, help="the base model folder, or 'tiny' (the test Llama)")
    make.add_argument("--target", required=True, help="the fine-tuned model folder")
    make.add_argument("--out", required=True, help="the delta folder to write")
    apply = commands.add_parser("apply", help="target = base + delta")
    apply.add_argument("--base", required=True, help="the base model folder the delta was made from, or 'tiny'")
    apply.add_argument("--delta", required=True, help="the delta folder")
    apply.add_argument("--out", required=True, help="where the rebuilt model goes")
    args = p.parse_args(argv)
    with exit_on_user_error():
        if args.command == "make":
            result = make_delta(args.base, args.target, args.out)
            counts = ", ".join(f"{n} {kind}" for kind, n in result["counts"].items() if n)
            print(f"delta of {args.target} against {args.base}: {counts} tensors, {result['delta_bytes'] / 2**20:,.1f} "
                  f"MiB (target {result['target_bytes'] / 2**20:,.1f} MiB) -> {result['out']}")
            print(f"rebuild it: python {Path(__file__).resolve()} apply --base=<the same base> "
                  f"--delta={Path(result['out']).resolve()} --out=<folder>")
        else:
            result = apply_delta(args.base, args.delta, args.out)
            print(f"rebuilt {result['tensors']} tensors in {result['shards']} file(s) from {args.base} + {args.delta} "
                  f"-> {result['out']}")
    return result


if __name__ == "__main__":
    main()
