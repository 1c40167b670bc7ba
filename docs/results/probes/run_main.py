"""run_main.py OUT STEPS key=value ...: the recipe's main distill configuration with overrides (JSON or str)."""

import json
import sys
from dataclasses import replace
from pathlib import Path

from turbokit.distill.trainer import train
from turbokit.recipes import recipe


def overrides(args: list[str]) -> dict[str, object]:
    """key=value arguments as config overrides: the value as JSON where it parses, else as a string."""
    over: dict[str, object] = {}
    for kv in args:
        k, v = kv.split("=", 1)
        try:
            over[k] = json.loads(v)
        except json.JSONDecodeError:
            over[k] = v
    return over


def config(out: str, steps: int, over: dict[str, object]):
    """The main run's configuration at `steps` steps, written to `out`, with `over` applied."""
    main = recipe.distill_config(Path("build/recipe-shapes"), "main", recipe.Budget(distill_steps=steps), 0, False)
    return replace(main, output_dir=out, **over)


if __name__ == "__main__":
    cfg = config(sys.argv[1], int(sys.argv[2]), overrides(sys.argv[3:]))
    print(cfg, flush=True)
    train(cfg)
