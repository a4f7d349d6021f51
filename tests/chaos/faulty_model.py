"""A plugin (DIFFSERVE_PLUGINS=tests.chaos.faulty_model) registering the demo pipeline with faults a
prompt can ask for, to test how the server survives them:

    "... crash@R"   rank R dies (os._exit) at the second denoise step
    "... raise@R"   rank R raises at the second step (its peers wait in a collective)
    "... hang@R"    rank R stops answering at the second step
"""

from __future__ import annotations

import os
import re
import time

import torch.distributed as dist

from diffserve.models.demo_dit.pipeline_demo_dit import DiffservePixelDiTPipeline
from diffserve.registry import register_model

FAULT = re.compile(r"\b(crash|raise|hang)@(\d+)\b")


class FaultyDemoPipeline(DiffservePixelDiTPipeline):
    def forward(self, req):
        faults = [FAULT.search(p) for p in req.prompt_texts]
        self._fault = next((m.groups() for m in faults if m), None)
        return super().forward(req)

    def set_step_callback(self, callback):
        if callback is None:
            return super().set_step_callback(None)

        def step(done: int, total: int) -> None:
            if self._fault is not None and done == 2:
                kind, rank = self._fault[0], int(self._fault[1])
                if (dist.get_rank() if dist.is_initialized() else 0) == rank:
                    if kind == "crash":
                        os._exit(137)
                    if kind == "raise":
                        raise RuntimeError(f"injected fault on rank {rank}")
                    time.sleep(3600)
            callback(done, total)

        return super().set_step_callback(step)


register_model("FaultyDemoPipeline", "tests.chaos.faulty_model:FaultyDemoPipeline")
