"""run_grouped.py OUT STEPS K key=value ...: run_main.py's run with every batch made of groups of K samples that
share one caption, each group's real images K different renders of that caption.

The fifteenth/sixteenth sessions' minibatch-std channel (groups of 4 across a batch of distinct captions) narrowed
the student. Their reading: the std across four different prompts measures the spread of the captions, not a
collapse under one caption. Here a head's group (`--disc_minibatch_std K`, consecutive samples) holds K fakes of one
caption from K noises and K reals of that caption, so a student that ignores its noise gives a group of near-equal
fakes against a group of varied reals.

A caption leaves things unsaid; each render redraws them: the size class when the caption omits it, the radius
within the class, the centre within its grid cell, and the background when the caption omits it. The grid cells
stay, so a stated position or relation stays true. Index i of the source is variant i % K of scene i // K, and the
loader shuffles whole groups.
"""

import sys
from dataclasses import replace

import numpy as np
import run_main  # the probe beside this one

from turbokit.distill import data as distill_data
from turbokit.distill.trainer import train
from turbokit.recipes import shapes


class GroupedShapes(shapes.ShapesSource):
    def __init__(self, base: shapes.ShapesSource, k: int) -> None:
        super().__init__(base.split, base.num_samples * k, base.size, base.seed)
        self.k, self.name = k, f"{base.name}&group={k}"

    def example(self, index: int) -> tuple[shapes.Scene, str]:
        group, variant = divmod(index, self.k)
        scene, text = shapes.example(self.split, group, self.seed)
        if variant == 0:
            return scene, text
        rng = np.random.default_rng((self.seed, 99, group, variant))
        said = shapes.parse_caption(text)  # None where the caption leaves a size or the background unsaid
        objects = []
        for o, stated in zip(scene.objects, said["objects"], strict=True):
            size = o.size if stated["size"] is not None else list(shapes.SIZES)[int(rng.integers(len(shapes.SIZES)))]
            x, y, radius = shapes.draw_placement(rng, size, shapes.POSITIONS.index(o.position))
            objects.append(replace(o, size=size, x=x, y=y, radius=radius))
        background = scene.background if said["background"] is not None else shapes.draw_background(rng, objects)
        return shapes.Scene(tuple(objects), background, scene.relation), text


def main() -> None:
    out, steps, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    config = run_main.config(out, steps, run_main.overrides(sys.argv[4:]))
    assert config.train_batch_size % k == 0, "whole groups per batch"

    build_source = distill_data.build_source

    def grouped_source(path, synthetic=False, captions=True):
        source = build_source(path, synthetic, captions)
        assert isinstance(source, shapes.ShapesSource), "grouping renders shapes scenes"
        return GroupedShapes(source, k)

    def block_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            groups = np.random.default_rng((self.seed, epoch)).permutation(len(self.source) // k)
            self._orders[epoch] = (groups[:, None] * k + np.arange(k)).reshape(-1)
        return self._orders[epoch]

    distill_data.build_source = grouped_source
    distill_data.ResumableLoader._order = block_order
    print(config, flush=True)
    train(config)


if __name__ == "__main__":
    main()
