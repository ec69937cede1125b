"""Scoring probe detections against a prompt's ground truth: colours, shapes, count and left/right order.

Prompted objects have distinct colours, so an object is "found" when the probe reports its colour;
when a colour is reported more than once, its largest segment stands for it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kinema.data.world import Sample, World
from kinema.eval.probe import DetectedObject, Probe, ProbeResult
from kinema.eval.probe_train import degrade

METRICS: tuple[str, ...] = ("colour_shape", "colour", "shape", "relation", "count_exact")


@dataclass(frozen=True)
class Truth:
    objects: tuple[tuple[str, str], ...]  # (colour, shape), ordered left to right

    def __post_init__(self) -> None:
        if not self.objects:
            raise ValueError("a truth needs at least one object")
        colours = [c for c, _ in self.objects]
        if len(set(colours)) != len(colours):
            raise ValueError(f"prompted colours must be distinct, got {colours}")

    @classmethod
    def from_sample(cls, sample: Sample) -> Truth:
        return cls(tuple((sample.objects[i].colour, sample.objects[i].shape) for i in sample.left_to_right))


def _largest_by_colour(objects: Sequence[DetectedObject]) -> dict[str, DetectedObject]:
    out: dict[str, DetectedObject] = {}
    for o in objects:
        if o.colour not in out or o.area > out[o.colour].area:
            out[o.colour] = o
    return out


def score(detected: ProbeResult | Sequence[DetectedObject], truth: Truth) -> dict[str, float | None]:
    """Per-image scores in [0, 1]; `relation` is None for single-object prompts.

    colour_shape: fraction of prompted objects whose colour is found with the right shape.
    colour: fraction whose colour is found. shape: fraction of prompted shapes found (as a
    multiset, any colour). relation: fraction of the prompt's ordered pairs (a left of b) that
    are both found with a's centre left of b's; a missing object makes its pairs wrong.
    count_exact: 1 when the number of detections equals the number of prompted objects.
    """
    objs = tuple(detected)
    n = len(truth.objects)
    found = _largest_by_colour(objs)
    have = Counter(o.shape for o in objs)
    want = Counter(s for _, s in truth.objects)
    relation = None
    if n >= 2:
        pairs = [(a, b) for i, (a, _) in enumerate(truth.objects) for b, _ in truth.objects[i + 1 :]]
        right = sum(a in found and b in found and found[a].u < found[b].u for a, b in pairs)
        relation = right / len(pairs)
    return {
        "colour_shape": sum(c in found and found[c].shape == s for c, s in truth.objects) / n,
        "colour": sum(c in found for c, _ in truth.objects) / n,
        "shape": sum(min(k, have[s]) for s, k in want.items()) / n,
        "relation": relation,
        "count_exact": float(len(objs) == n),
    }


def aggregate(scores: Sequence[dict[str, float | None]]) -> dict[str, float | int]:
    """Mean of each metric over the images where it is defined, plus `n` and `n_relation`."""
    if not scores:
        raise ValueError("no scores to aggregate")
    out: dict[str, float | int] = {"n": len(scores)}
    for key in METRICS:
        vals = [s[key] for s in scores if s[key] is not None]
        out[key] = float(np.mean(vals)) if vals else float("nan")
        if key == "relation":
            out["n_relation"] = len(vals)
    return out


def evaluate(probe: Probe, images: np.ndarray | Sequence[np.ndarray], truths: Sequence[Truth], batch: int = 64) -> dict:
    """Probe every image (uint8 or float (H, W, 3)), score it against its truth and aggregate."""
    if len(images) != len(truths):
        raise ValueError(f"{len(images)} images but {len(truths)} truths")
    scores = []
    for i in range(0, len(images), batch):
        results = probe.detect(list(images[i : i + batch]))
        scores.extend(score(r, t) for r, t in zip(results, truths[i : i + batch], strict=True))
    return aggregate(scores)


def evaluate_world(
    probe: Probe,
    world: World | None = None,
    split: str = "test",
    n: int = 1000,
    start: int = 0,
    blur: float = 0.0,
    noise: float = 0.0,
) -> dict:
    """`evaluate` on `n` ground-truth renders of `split`, optionally blurred and noised first."""
    world = world or World()
    images, truths = [], []
    for i in range(start, start + n):
        s = world.sample(split, i)
        rgb = degrade(s.rgb, blur=blur, noise=noise, seed=i) if blur or noise else s.rgb
        images.append(np.round(rgb * 255).astype(np.uint8))  # judged as saved images are
        truths.append(Truth.from_sample(s))
    return evaluate(probe, images, truths) | {"split": split, "start": start, "blur": blur, "noise": noise}
