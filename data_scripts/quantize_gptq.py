"""Quantize a local Hugging Face Llama-family model to GPTQ (4-bit by default) for sft/peft-int4 and cls/peft-int4.

    python data_scripts/quantize_gptq.py --model_path=/models/Llama-2-7b-hf --out_dir=/models/Llama-2-7b-gptq-int4
    python data_scripts/quantize_gptq.py --model_path=tiny --out_dir=/tmp/tiny-gptq      # the tiny test Llama, seconds

Calibration: the text of every record of --calibration_data (.jsonl, .json or .jsonl.zst; all string fields of a
record, chat messages included) is joined end to end and cut into --n_samples windows of --seq_len tokens. Use text
like what the model will see; the bundled sample data is only enough for the tiny model. The full-precision model
is loaded into host RAM (65B: about 130 GB in fp16) and GPTQ (gptqmodel through transformers' GPTQConfig) moves one
decoder block at a time to GPU 0 when there is one (fp16), so one 24 GB card quantizes a 65B model; without a GPU it
quantizes on CPU (fp32; fine for the tiny model, slow for real ones). out_dir gets the quantized model in GPTQ v1
format and the tokenizer, written atomically (built in a temporary folder, then renamed). Every layer's input size
must be a multiple of --group_size.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a standalone script: make `common` importable
from common.config import UserError, exit_on_user_error, parse_bool  # noqa: E402
from common.data import read_records  # noqa: E402
from common.gptq import GPTQ_BITS, SAMPLE_CALIBRATION, quantize_gptq, record_texts  # noqa: E402
from common.logs import quiet_third_party_logs  # noqa: E402
from common.model import resolve_model_path  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True, help="a local Hugging Face model folder, or 'tiny' (the test Llama)")
    p.add_argument("--out_dir", required=True, help="where the quantized model and tokenizer go (replaced if there)")
    p.add_argument("--bits", type=int, default=4, choices=GPTQ_BITS, help="bits per weight (default 4)")
    p.add_argument("--group_size", type=int, default=128, help="input columns sharing one scale; -1: one per row")
    p.add_argument("--desc_act", type=parse_bool, nargs="?", const=True, default=False,
                   help="quantize columns by decreasing activation (act-order): a little more accurate, slower kernels")
    p.add_argument("--calibration_data", default=str(SAMPLE_CALIBRATION), help="records whose text calibrates GPTQ")
    p.add_argument("--n_samples", type=int, default=128, help="calibration windows (GPTQ paper: 128)")
    p.add_argument("--seq_len", type=int, default=512, help="tokens per calibration window")
    args = p.parse_args(argv)
    quiet_third_party_logs()  # GPTQ's own per-block progress bars stay

    with exit_on_user_error():
        model_dir = resolve_model_path(args.model_path)
        texts = record_texts(read_records(args.calibration_data))
        if not texts:
            raise UserError(f"{args.calibration_data}: no text in any record (no string fields)")
        result = quantize_gptq(model_dir, args.out_dir, args.bits, args.group_size, args.desc_act, texts, args.seq_len,
                               n_samples=args.n_samples)
    print(f"quantized {args.model_path} ({model_dir}) to GPTQ int{args.bits}, group {args.group_size}, "
          f"desc_act {args.desc_act}, on {result['samples']} calibration windows ({result['tokens']:,} tokens), "
          f"{result['compute']}, in {result['seconds']:.1f}s -> {result['out_dir']}")
    print(f"train on it: bash sft/peft-int4/run.sh --model_path={Path(result['out_dir']).resolve()}")


if __name__ == "__main__":
    main()
