"""Device memory in use as pynvml reports it, sampled on a background thread during the steps."""

from __future__ import annotations

import threading


class NvmlPeak:
    """Highest `nvmlDeviceGetMemoryInfo(handle).used` seen between start() and stop()."""

    def __init__(self, index: int = 0, interval_s: float = 0.002) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.peak = 0

    def used(self) -> int:
        return self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.used())
            self._stop.wait(self._interval)

    def start(self) -> None:
        self.peak = self.used()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.peak = max(self.peak, self.used())
        return self.peak
