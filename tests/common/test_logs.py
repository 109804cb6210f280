"""The step log's memory fields: on GPUs the allocated peak, the reserved peak and the card's used memory (which sees
bitsandbytes' paged optimizer pages), each named in metrics.jsonl and in the step line; on CPU the RSS peak. torch.cuda
is monkeypatched (no GPU here)."""
import json

import torch

from common.logs import StepLogger, format_step, memory_gb

GB = 10 ** 9


def fake_gpus(monkeypatch, allocated, reserved, free_total):
    """Two GPUs with the given peaks and (free, total) memory, by index."""
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: allocated[d.index])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d: reserved[d.index])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: free_total[d.index])


def test_gpu_memory_names_the_allocated_and_reserved_peaks_and_the_used_memory(monkeypatch, tmp_path):
    # GPU 1 holds paged optimizer pages torch never allocated: only mem_get_info sees them
    fake_gpus(monkeypatch, allocated=[3 * GB, 2 * GB], reserved=[4 * GB, 5 * GB],
              free_total=[(20 * GB, 24 * GB), (14 * GB, 24 * GB)])
    devices = [torch.device("cuda", 0), torch.device("cuda", 1)]
    fields = memory_gb(devices)
    assert fields == {"mem_gb": 3.0, "mem_reserved_gb": 5.0, "mem_used_gb": 10.0}  # the fullest GPU of each
    assert memory_gb(devices[1]) == {"mem_gb": 2.0, "mem_reserved_gb": 5.0, "mem_used_gb": 10.0}
    line = format_step(3, 10, {"loss": 1.5, "tokens_per_s": 1000.0, **fields})
    assert line.endswith("1,000 tok/s | mem 3.00 GB peak alloc | 5.00 GB peak reserved | 10.00 GB used on GPU"), line
    log = StepLogger(tmp_path, 10, report_to=())
    log.log(3, {"loss": 1.5, **fields})
    log.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert (row["mem_gb"], row["mem_reserved_gb"], row["mem_used_gb"]) == (3.0, 5.0, 10.0)


def test_cpu_memory_is_the_rss_peak(monkeypatch):
    def no_gpu(*args):
        raise AssertionError("a CPU run asked torch.cuda")

    for name in ("max_memory_allocated", "max_memory_reserved", "mem_get_info"):
        monkeypatch.setattr(torch.cuda, name, no_gpu)
    before = memory_gb(torch.device("cpu"))["mem_rss_gb"]
    block = bytearray(300 * 2 ** 20)  # touch 300 MiB: the peak grows by about that
    block[::4096] = b"x" * len(block[::4096])
    fields = memory_gb(torch.device("cpu"))
    assert list(fields) == ["mem_rss_gb"] and fields["mem_rss_gb"] >= max(before, 0.3)
    assert format_step(1, 2, fields) == f"step 1/2 | mem {fields['mem_rss_gb']:.2f} GB peak RSS"
