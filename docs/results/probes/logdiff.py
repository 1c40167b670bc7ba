"""Where two training runs part: logdiff.py RUN_A RUN_B — the first logged step at which any scalar differs.

Reads every TensorBoard event file under each run's logs/ (a resumed run has one per attempt; a later attempt's
value for a step wins) and compares the steps both logged, scalar by scalar, exactly.
"""

import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def scalars(run: Path) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for events in sorted(run.glob("logs/**/events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


a, b = scalars(Path(sys.argv[1])), scalars(Path(sys.argv[2]))
tags = sorted(set(a) & set(b))
steps = sorted(set.intersection(*(set(a[t]) & set(b[t]) for t in tags))) if tags else []
if not steps:
    sys.exit("no step logged by both runs yet")
print(f"{len(steps)} common steps, {steps[0]} to {steps[-1]}")
for step in steps:
    differ = [f"{t} {a[t][step]:.7g} vs {b[t][step]:.7g}" for t in tags if a[t][step] != b[t][step]]
    if differ:
        print(f"first difference at step {step}:", *differ, sep="\n  ")
        break
else:
    print("identical at every common step")
