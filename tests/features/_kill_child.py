"""Child process of the kill -9 tests: collect a store, or train an SAE with checkpoints, slowly enough
that the parent can kill it in the middle (run as a script, never imported by pytest)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)


def main() -> None:
    what, out = sys.argv[1], Path(sys.argv[2])
    if what == "collect":
        from store_cases import collect_args

        from mechscope.features.store import writer

        original = writer._write_bytes

        def slow(path: Path, data: bytes) -> None:
            original(path, data)
            time.sleep(0.15)

        writer._write_bytes = slow
        model, texts, kwargs = collect_args()
        writer.collect_store(model, kwargs.pop("sites"), texts, out, **kwargs)
    else:
        from safetensors.torch import load_file
        from store_cases import train_args

        from mechscope.features import train as train_module

        x = load_file(str(out.parent / "x.safetensors"))["x"]
        config, cfg = train_args()
        original = train_module._save_checkpoint

        def slow(*args: object, **kwargs: object) -> None:
            original(*args, **kwargs)  # type: ignore[arg-type]
            time.sleep(0.1)

        train_module._save_checkpoint = slow
        train_module.train_sae(x, config, cfg, checkpoint=out)


if __name__ == "__main__":
    main()
