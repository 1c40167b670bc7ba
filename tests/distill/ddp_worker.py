"""One process of the 2-process DDP test (tests/distill/test_multiprocess.py), started by `accelerate launch`.

It runs `turbokit.distill.trainer.train` unchanged on tiny models, and records, without changing the
trainer's behaviour:

- the student (and discriminator heads) that `Accelerator.prepare` returned on *this* process, by
  swapping in an `Accelerator` subclass that keeps a reference to the prepared models; after `train`
  returns, this process's in-memory weights are hashed into `rank-{rank}.sha256` (the checkpoints
  cannot show this: accelerate writes model weights from the main process only);
- the captions of every batch this process's data loader produced, into `rank-{rank}.json`, so the
  test can check that the processes were given disjoint slices of each global batch.

Usage: python ddp_worker.py OUTPUT_DIR METHOD TEACHER DATA [DINO]
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from torch import nn


def state_digest(module: nn.Module) -> str:
    """sha256 of a module's state dict: every key and its fp32 tensor bytes, in sorted key order."""
    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def main(argv: list[str]) -> None:
    from accelerate import Accelerator

    from turbokit.distill import data as distill_data
    from turbokit.distill import trainer
    from turbokit.distill.config import DistillConfig

    out, method, teacher, data = argv[:4]
    dino = argv[4] if len(argv) > 4 else ""
    seen: list[Accelerator] = []
    captions: list[str] = []

    class RecordingAccelerator(Accelerator):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            seen.append(self)
            self.prepared: tuple = ()
            self.where: dict = {}

        def prepare(self, *args, **kwargs):
            result = super().prepare(*args, **kwargs)
            self.prepared = result if isinstance(result, tuple) else (result,)
            # read now: end_training() at the end of train() destroys the process group and resets the state
            self.where = {
                "rank": self.process_index,
                "world_size": self.num_processes,
                "distributed_type": self.distributed_type.value,
                "backend": self.state.backend,
            }
            return result

    class RecordingLoader(distill_data.ResumableLoader):
        def __next__(self) -> distill_data.Batch:
            batch = super().__next__()
            captions.extend(batch.captions)
            return batch

    discriminators: list = []
    build_discriminator = trainer.build_discriminator

    def recording_build_discriminator(*args, **kwargs):
        discriminators.append(build_discriminator(*args, **kwargs))
        return discriminators[-1]

    trainer.build_discriminator = recording_build_discriminator
    trainer.Accelerator = RecordingAccelerator  # type: ignore[misc]
    distill_data.ResumableLoader = RecordingLoader  # type: ignore[misc]

    cfg = DistillConfig(
        teacher=teacher,
        data=data,
        output_dir=out,
        method=method,
        dino_model=dino,
        train_batch_size=2,
        max_train_steps=2,
        checkpointing_steps=2,
        report_to="none",
        progress=False,
        learning_rate=1e-3,
        disc_learning_rate=1e-3,
    )
    trainer.train(cfg)

    accelerator = seen[0]
    rank = accelerator.where["rank"]
    student = accelerator.unwrap_model(accelerator.prepared[0])
    heads = discriminators[0].heads  # replicated, averaged by the trainer itself (not wrapped by accelerate)
    digest = state_digest(student)
    Path(out, f"rank-{rank}.sha256").write_text(digest + "\n")
    info = {
        **accelerator.where,
        "student_wrapped_in": type(accelerator.prepared[0]).__name__,
        "student_sha256": digest,
        "heads_sha256": state_digest(heads),
        "captions": captions,
    }
    Path(out, f"rank-{rank}.json").write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
