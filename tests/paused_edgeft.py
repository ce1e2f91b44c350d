"""`edgeft ARGS` that stops at one exact moment of a run, for tests/test_reliability.py and
scripts/reliability_smollm2.py:

    python tests/paused_edgeft.py POINT:STEP MARKER ARGS...

Under mlx.launch every rank runs it: "{rank}" in MARKER becomes the rank (MLX_RANK), so each
rank has its own marker.

On reaching POINT of step STEP the process writes MARKER and waits until it is deleted, so
the caller can SIGKILL (or signal) it there and nowhere else. The points:
  step        step N's gradients are computed, the optimizer has not stepped
  checkpoint  checkpoint N is half written (adapters in its temporary folder, nothing else)
  eval        the validation loss of step N is computed, not yet recorded
  adapters    training finished (final checkpoint N written), final adapters not yet saved

It wraps the functions the run calls at those moments, then runs edgeft's CLI.
"""

import os
import sys
import time
from pathlib import Path

from edgeft import checkpoints, cli, lora, trainer

done = {"steps": 0}  # optimizer steps completed in this run so far


def pause(at: str, marker: Path, point: str, step: int) -> None:
    if f"{point}:{step}" != at:
        return
    marker.write_text(f"{at} {os.getpid()}\n")
    deadline = time.monotonic() + 600
    while marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def wrap(owner, name, before=None, after=None):
    """Replace owner.name with a function that calls before(*args), then the original, then
    after(result)."""
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        if before:
            before(*args, **kwargs)
        result = original(*args, **kwargs)
        if after:
            after(result)
        return result

    setattr(owner, name, wrapped)


def main(at: str, marker: Path, args: list[str]) -> None:
    def pausing_update(model, optimizer, *args, **kwargs):
        update = compiled_update(model, optimizer, *args, **kwargs)

        def paused(*a):
            step = int(optimizer.step) + 1  # the optimizer counts its updates; checkpoints keep the count
            pause(at, marker, "step", step)
            done["steps"] = step
            return update(*a)

        return paused

    def before_save(target, arrays, metadata=None):
        target = Path(target)  # checkpoints/.step_NNNNNN.tmp/optimizer.safetensors, the second file
        if target.name == checkpoints.OPTIMIZER:
            pause(at, marker, "checkpoint", int(target.parent.name.split("_")[1].split(".")[0]))

    def after_train(state):
        done["steps"] = state.step

    compiled_update = trainer.compiled_update
    trainer.compiled_update = pausing_update  # the step's update is compiled: pause before the call
    wrap(checkpoints, "atomic_save_safetensors", before=before_save)
    wrap(trainer, "evaluate", after=lambda loss: pause(at, marker, "eval", done["steps"]))
    wrap(trainer, "train", after=after_train)
    wrap(lora, "save_adapters", before=lambda *a, **k: pause(at, marker, "adapters", done["steps"]))
    sys.argv = ["edgeft", *args]
    cli.main()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2].replace("{rank}", os.environ.get("MLX_RANK", "0"))), sys.argv[3:])
