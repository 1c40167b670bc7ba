"""soup.py OUT A B [C ...]: a uniform average of students' UNets ("model soup"); the rest is copied from A.

A model named twice counts twice (A B B: one third A, two thirds B).

Students distilled from one teacher start from the same weights, so their weights can be averaged. This asks
whether the average of two seeds is better than either seed (the 1-step seed spread is 23-45%).
"""

import shutil
import sys
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

out, sources = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
for part in ("text_encoder", "vae"):  # frozen in distillation: must match, or A's copy would be wrong for B
    weights = [load_file(next((p / part).glob("*.safetensors"))) for p in sources]
    worst = max((w[k].float() - weights[0][k].float()).abs().max().item() for w in weights[1:] for k in w)
    print(f"{part}: largest difference from A's {worst:.2e}")
unets = [UNet2DConditionModel.from_pretrained(p, subfolder="unet", torch_dtype=torch.float32) for p in sources]
states = [u.state_dict() for u in unets]
unets[0].load_state_dict({k: sum(s[k] for s in states) / len(states) for k in states[0]})
shutil.copytree(sources[0], out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("unet"))
unets[0].save_pretrained(out / "unet")
print("wrote", out)
