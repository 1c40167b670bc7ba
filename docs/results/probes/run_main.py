"""run_main.py OUT STEPS key=value ...: the recipe's main distill configuration with overrides (JSON or str)."""

import json
import sys
from dataclasses import replace
from pathlib import Path

from turbokit.distill.trainer import train
from turbokit.recipes import recipe

out, steps = sys.argv[1], int(sys.argv[2])
over = {}
for kv in sys.argv[3:]:
    k, v = kv.split("=", 1)
    try:
        over[k] = json.loads(v)
    except json.JSONDecodeError:
        over[k] = v
config = recipe.distill_config(Path("build/recipe-shapes"), "main", recipe.Budget(distill_steps=steps), 0, False)
config = replace(config, output_dir=out, **over)
print(config, flush=True)
train(config)
