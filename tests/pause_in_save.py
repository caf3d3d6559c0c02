"""`dcgan` whose checkpoint save stops half way, for a test to SIGKILL it there:

    python tests/pause_in_save.py STEP MARKER ARGS...

runs `dcgan ARGS...` in this process (`train --launcher torchrun`, one rank, trains here), but once the
save of checkpoint STEP has written its first file, it creates MARKER (outside the checkpoint) and
sleeps: the checkpoint then holds some of its parts and not others. The pause is patched in here
so that the product's save carries no test hooks.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, from any directory

import trainer.checkpoint  # noqa: E402
import trainer.checkpoint_io  # noqa: E402
from dcgan.cli import main  # noqa: E402

PAUSE_S = 600  # the test kills it long before; a test that died leaves it for no longer


def pause_after_first_file(step: int, marker: Path) -> None:
    """Every file of a checkpoint goes through save_file (DeepSpeed's engine parts and the rank file); the
    checkpoint module imported it by name, so both names are replaced."""
    save = trainer.checkpoint_io.save_file
    folder = f"{trainer.checkpoint.TMP_PREFIX}{step:08d}"

    def save_then_pause(obj: Any, path: str | Path, **save_kwargs: Any) -> None:
        save(obj, path, **save_kwargs)
        if folder in Path(path).parts:
            marker.write_text(f"{path}\n")
            time.sleep(PAUSE_S)

    trainer.checkpoint_io.save_file = save_then_pause
    trainer.checkpoint.save_file = save_then_pause


if __name__ == "__main__":
    pause_after_first_file(int(sys.argv[1]), Path(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
