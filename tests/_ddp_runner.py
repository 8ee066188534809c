"""Run edgemap's finetune() with JSON options under torchrun (used by test_distributed.py).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/_ddp_runner.py DATA OUT '{"backbone": "tiny"}' [PIDDIR]
"""

import json
import os
import sys
from pathlib import Path

from edgemap.train.finetune import FinetuneOptions, finetune

if __name__ == "__main__":
    data, out, opts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    if len(sys.argv) > 4:
        Path(sys.argv[4], f"rank{os.environ.get('RANK', '0')}.pid").write_text(str(os.getpid()))
    if "crop_scale" in opts:
        opts["crop_scale"] = tuple(opts["crop_scale"])
    finetune(data, out, FinetuneOptions(**opts))
    from edgemap.train.distributed import exit_worker

    exit_worker(0)
