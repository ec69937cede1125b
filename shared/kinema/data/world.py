"""The synthetic world as a dataset: deterministic samples and clips from (seed, split, index)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kinema.data.render import Frame, forward_flow, render
from kinema.data.scene import SPLITS, Scene, WorldParams, caption, left_to_right, project, sample_scene


@dataclass(frozen=True)
class ObjectLabel:
    shape: str
    colour: str
    size: str
    radius: float
    position: tuple[float, float]  # world (x, z) on the floor
    image_position: tuple[float, float]  # projected centre, normalised (u, v)


@dataclass(frozen=True)
class Sample:
    rgb: np.ndarray  # (H, W, 3) float32 in [0, 1]
    depth: np.ndarray  # (H, W) float32
    instances: np.ndarray  # (H, W) uint8, 0 = background, k + 1 = objects[k]
    objects: tuple[ObjectLabel, ...]  # in scene order (matches the instance ids)
    left_to_right: tuple[int, ...]  # object indices ordered by image position
    caption: str


@dataclass(frozen=True)
class Clip:
    rgb: np.ndarray  # (T, H, W, 3)
    depth: np.ndarray  # (T, H, W)
    instances: np.ndarray  # (T, H, W)
    flow: np.ndarray  # (T - 1, H, W, 2) forward motion in pixels, frame t -> t + 1
    caption: str  # describes frame 0


class World:
    """Deterministic access to the world: the same (seed, split, index) always gives the same sample."""

    def __init__(self, params: WorldParams | None = None) -> None:
        self.params = params or WorldParams()

    def _rng(self, split: str, index: int) -> np.random.Generator:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        return np.random.default_rng([self.params.seed, SPLITS[split], index])

    def scene(self, split: str, index: int, n_objects: int | None = None) -> Scene:
        return sample_scene(self.params, self._rng(split, index), n_objects)

    def sample(self, split: str, index: int) -> Sample:
        return self.sample_from_scene(self.scene(split, index))

    def sample_from_scene(self, scene: Scene) -> Sample:
        p = self.params
        frame = render(scene, p.resolution, p.fov_deg)
        return Sample(
            rgb=frame.rgb,
            depth=frame.depth,
            instances=frame.instances,
            objects=_labels(scene, p.fov_deg),
            left_to_right=tuple(left_to_right(scene, p.fov_deg)),
            caption=caption(scene, p.fov_deg),
        )

    def clip(self, split: str, index: int, frames: int = 8) -> Clip:
        """`frames` frames of one scene with camera and object motion, plus exact forward flow."""
        if frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        p = self.params
        scene = self.scene(split, index)
        rendered: list[Frame] = [render(scene.at_frame(t), p.resolution, p.fov_deg) for t in range(frames)]
        flows = [forward_flow(scene, t, rendered[t], p.resolution, p.fov_deg) for t in range(frames - 1)]
        return Clip(
            rgb=np.stack([f.rgb for f in rendered]),
            depth=np.stack([f.depth for f in rendered]),
            instances=np.stack([f.instances for f in rendered]),
            flow=np.stack(flows) if flows else np.zeros((0, p.resolution, p.resolution, 2), np.float32),
            caption=caption(scene, p.fov_deg),
        )

    def images(self, split: str, start: int, count: int) -> tuple[np.ndarray, list[str]]:
        """(count, H, W, 3) uint8 images and their captions."""
        out = np.empty((count, self.params.resolution, self.params.resolution, 3), np.uint8)
        caps = []
        for i in range(count):
            s = self.sample(split, start + i)
            out[i] = np.round(s.rgb * 255).astype(np.uint8)
            caps.append(s.caption)
        return out, caps


def _labels(scene: Scene, fov_deg: float) -> tuple[ObjectLabel, ...]:
    return tuple(
        ObjectLabel(
            shape=o.shape,
            colour=o.colour,
            size=o.size,
            radius=o.radius,
            position=(o.x, o.z),
            image_position=project(scene.camera, o.centre(), fov_deg),
        )
        for o in scene.objects
    )


def _render_chunk(args: tuple[WorldParams, str, int, int]) -> tuple[np.ndarray, list[str]]:
    params, split, start, count = args
    return World(params).images(split, start, count)


def render_images(world: World, split: str, count: int, workers: int = 1) -> tuple[np.ndarray, list[str]]:
    """`world.images(split, 0, count)`, split over `workers` processes; the result does not depend on `workers`."""
    if workers <= 1 or count < 2 * workers:
        return world.images(split, 0, count)
    import multiprocessing

    chunk = -(-count // (4 * workers))
    jobs = [(world.params, split, s, min(chunk, count - s)) for s in range(0, count, chunk)]
    # spawn, not fork: callers may already hold torch's thread pools or a CUDA context.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        parts = pool.map(_render_chunk, jobs)
    return np.concatenate([p[0] for p in parts]), [c for p in parts for c in p[1]]


def cached_images(
    world: World, split: str, count: int, cache_dir: Path, workers: int = 1
) -> tuple[np.ndarray, list[str]]:
    """`world.images(split, 0, count)`, rendered once (over `workers` processes) and kept in `cache_dir`."""
    key = hashlib.sha256(json.dumps([asdict(world.params), split, count]).encode()).hexdigest()[:16]
    img_path = cache_dir / f"world-{split}-{count}-{key}.npy"
    cap_path = img_path.with_suffix(".json")
    if img_path.exists() and cap_path.exists():
        return np.load(img_path), json.loads(cap_path.read_text())
    images, caps = render_images(world, split, count, workers)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = img_path.with_suffix(".tmp.npy")
    np.save(tmp, images)
    cap_path.write_text(json.dumps(caps))
    tmp.rename(img_path)  # written whole or not at all
    return images, caps
