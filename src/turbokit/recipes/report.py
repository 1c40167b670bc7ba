"""The figures of docs/results.md from a finished recipe: the study's table and the image grids.

    python -m turbokit.recipes.report --root build/recipe-shapes --out docs/results

writes `table.md` (the rows of ROOT/eval/results.jsonl) and the grids: the same prompt and seed at 1–8
steps (student and teacher), and the student at six sizes around its native 64×64. `--prompt TEXT` (repeatable)
draws the grids' rows from other prompts than the study's three.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

GRID_PROMPTS = (
    "a red circle on a blue background",
    "a large yellow star in the center on a gray background",
    "a green triangle to the left of a purple square",
)
SIZES = ((32, 32), (48, 48), (64, 64), (80, 80), (96, 96), (128, 64))
SCALE = 2  # grids are enlarged (nearest neighbour) so that 64-pixel images are readable


def _labelled_row(images: Sequence[Image.Image], labels: Sequence[str], height: int) -> Image.Image:
    images = [im.resize((im.width * SCALE, im.height * SCALE), Image.NEAREST) for im in images]
    width = sum(im.width for im in images) + 4 * (len(images) - 1)
    row = Image.new("RGB", (width, height * SCALE + 14), "white")
    x = 0
    for image, label in zip(images, labels, strict=True):
        row.paste(image, (x, 14))
        ImageDraw.Draw(row).text((x + 2, 1), label, fill="black")
        x += image.width + 4
    return row


def _stack(rows: Sequence[Image.Image]) -> Image.Image:
    grid = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows) + 4 * (len(rows) - 1)), "white")
    y = 0
    for row in rows:
        grid.paste(row, (0, y))
        y += row.height + 4
    return grid


def steps_grid(pipe, prompts: Sequence[str], guidance: float, seed: int = 0, steps: Sequence[int] = range(1, 9)):
    """One row per prompt: the same seed at each step count."""
    rows = []
    for prompt in prompts:
        images = [pipe(prompt, steps=n, guidance_scale=guidance, seed=seed).images[0] for n in steps]
        rows.append(_labelled_row(images, [f"{n} step{'s' * (n > 1)}" for n in steps], pipe.native_size))
    return _stack(rows)


def sizes_grid(pipe, prompts: Sequence[str], seed: int = 0, steps: int = 1):
    rows = []
    for prompt in prompts:
        images = [pipe(prompt, steps=steps, width=w, height=h, seed=seed).images[0] for w, h in SIZES]
        rows.append(_labelled_row(images, [f"{w}x{h}" for w, h in SIZES], max(h for _, h in SIZES)))
    return _stack(rows)


def table(rows: Sequence[dict]) -> str:
    """The study's table in Markdown: the teacher, the student, then the ablations, each by steps."""
    group = {"teacher": 0, "student": 1}
    rows = sorted(rows, key=lambda r: (group.get(r["name"], 2), r["name"] != "ablation both", r["name"], r["steps"]))
    head = (
        "| row | steps | CFG | FID ↓ | alignment ↑ | held-out alignment ↑ | shape | colour | size | position "
        "| background | count | s/image |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['steps']} | {r['guidance']:g} | {r['fid']:.2f} | {r['alignment']:.3f} "
            f"| {r.get('heldout_alignment', float('nan')):.3f} | {r['shape']:.3f} | {r['colour']:.3f} "
            f"| {r['size']:.3f} | {r['position']:.3f} | {r['background']:.3f} | {r['count']:.3f} "
            f"| {r['seconds_per_image'] * 1000:.1f} ms |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    from turbokit.pipeline import TurboPipeline
    from turbokit.recipes.recipe import TEACHER_GUIDANCE

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="build/recipe-shapes")
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--student", default=None, help="default: ROOT/student/main/student")
    parser.add_argument("--prompt", action="append", help="a grid row's prompt (repeatable; default: the study's)")
    args = parser.parse_args(argv)
    prompts = args.prompt or GRID_PROMPTS
    root, out = Path(args.root), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = root / "eval" / "results.jsonl"
    if results.is_file():
        rows = [json.loads(line) for line in results.read_text().splitlines() if line]
        (out / "table.md").write_text(table(rows), encoding="utf-8")
    student = TurboPipeline.from_pretrained(args.student or root / "student" / "main" / "student")
    teacher = TurboPipeline.from_pretrained(root / "teacher" / "model")
    steps_grid(student, prompts, 0.0).save(out / "student-steps.png")
    steps_grid(teacher, prompts, TEACHER_GUIDANCE, steps=(*range(1, 9), 25, 50)).save(out / "teacher-steps.png")
    sizes_grid(student, prompts).save(out / "student-sizes.png")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
