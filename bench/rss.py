"""Anonymous resident memory (RssAnon) of this process, and its peak over a block of code: memory really taken, not
the memory-mapped checkpoint files that ru_maxrss also counts. The bench scripts' child processes measure with it.

    with PeakAnon() as memory:
        load_or_train()
    print(memory.peak - memory.base)          # bytes added at the peak; memory.after: what stays
"""
import threading
import time


def anon_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no RssAnon line (Linux only)")


class PeakAnon:
    """A thread samples anon_bytes() every `interval` seconds while the block runs; base, peak and after in bytes."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.base, self.peak, self.after = interval, 0, 0, 0

    def __enter__(self):
        self.base = self.peak = anon_bytes()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._done.is_set():
            self.peak = max(self.peak, anon_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.after = anon_bytes()
        self.peak = max(self.peak, self.after)
        return False
