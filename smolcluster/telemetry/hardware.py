"""What this process uses of the machine: CPU %, resident memory, and the GPU's when there is one."""

from __future__ import annotations

import psutil
import torch


class HardwareSampler:
    def __init__(self):
        self.process = psutil.Process()
        self.process.cpu_percent(None)  # the first call only starts the measuring interval
        psutil.cpu_percent(None)

    def sample(self) -> dict[str, float]:
        out = {"cpu_percent": self.process.cpu_percent(None), "rss_bytes": self.process.memory_info().rss,
               "system_cpu_percent": psutil.cpu_percent(None)}
        if torch.cuda.is_available():
            out["gpu_memory_bytes"] = torch.cuda.memory_allocated()
            out["gpu_memory_reserved_bytes"] = torch.cuda.memory_reserved()
            try:
                out["gpu_utilization"] = torch.cuda.utilization()  # needs pynvml / amdsmi
            except Exception:
                pass
        return out
