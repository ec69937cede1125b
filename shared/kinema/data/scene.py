"""Scene sampling and captions for the synthetic world.

A scene is a handful of coloured primitives standing on a textured floor in front of a back
wall, seen by a pinhole camera. Everything here is plain data (no pixels): `render.py` turns a
`Scene` into images, depth, masks and motion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

SHAPES: tuple[str, ...] = ("sphere", "cube", "cone")
# Hues 60 degrees apart so that shading never moves one colour into another's band.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.10),
    "yellow": (0.90, 0.82, 0.12),
    "green": (0.15, 0.72, 0.18),
    "cyan": (0.10, 0.76, 0.82),
    "blue": (0.14, 0.24, 0.88),
    "purple": (0.62, 0.16, 0.84),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SIZES: dict[str, float] = {"small": 0.32, "large": 0.5}
FLOOR_PATTERNS: tuple[str, ...] = ("plain", "checker", "stripes")
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class WorldParams:
    """Knobs of the procedural world; defaults are the 64 px world every mini model uses."""

    resolution: int = 64
    min_objects: int = 1
    max_objects: int = 3
    fov_deg: float = 48.0
    # Objects whose projected centres are closer than this (fraction of image width) are
    # rejected so that "left of" is always visible in the picture.
    min_separation: float = 0.16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.resolution < 8:
            raise ValueError(f"resolution must be >= 8, got {self.resolution}")
        if not 1 <= self.min_objects <= self.max_objects <= len(COLOURS):
            raise ValueError("need 1 <= min_objects <= max_objects <= number of colours")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    radius: float  # world units; cube half-extent, cone base radius
    x: float
    z: float
    yaw: float  # rotation about the vertical axis (cubes)
    velocity: tuple[float, float] = (0.0, 0.0)  # world units per frame on the floor (x, z)

    @property
    def height(self) -> float:
        return {"sphere": 2 * self.radius, "cube": 2 * self.radius, "cone": 2.2 * self.radius}[self.shape]

    def centre(self) -> np.ndarray:
        return np.array([self.x, self.height / 2, self.z])

    def moved(self, frames: float) -> SceneObject:
        return replace(self, x=self.x + self.velocity[0] * frames, z=self.z + self.velocity[1] * frames)


@dataclass(frozen=True)
class Camera:
    yaw: float  # radians, 0 looks along -z
    pitch: float  # radians below the horizon
    distance: float
    target: tuple[float, float, float] = (0.0, 0.3, 0.0)

    def position(self) -> np.ndarray:
        cy, sy, cp, sp = math.cos(self.yaw), math.sin(self.yaw), math.cos(self.pitch), math.sin(self.pitch)
        back = np.array([sy * cp, sp, cy * cp])
        return np.asarray(self.target) + self.distance * back

    def basis(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(right, up, forward) unit vectors in world space."""
        f = np.asarray(self.target) - self.position()
        f /= math.sqrt(f @ f)
        # right = forward x world-up, up = right x forward, written out: np.cross is slow on 3-vectors.
        right = np.array([-f[2], 0.0, f[0]]) / math.hypot(f[0], f[2])
        up = np.array([-right[2] * f[1], right[2] * f[0] - right[0] * f[2], right[0] * f[1]])
        return right, up, f


@dataclass(frozen=True)
class Appearance:
    floor_a: tuple[float, float, float]
    floor_b: tuple[float, float, float]
    floor_pattern: str
    floor_scale: float
    wall_top: tuple[float, float, float]
    wall_bottom: tuple[float, float, float]
    light: tuple[float, float, float]  # unit vector towards the light


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    camera: Camera
    appearance: Appearance
    # Per-frame camera change for clips: (d_yaw, d_distance) per frame.
    camera_motion: tuple[float, float] = (0.0, 0.0)
    caption_style: int = 0
    extras: dict = field(default_factory=dict, compare=False)

    def at_frame(self, t: int) -> Scene:
        cam = replace(
            self.camera,
            yaw=self.camera.yaw + self.camera_motion[0] * t,
            distance=self.camera.distance + self.camera_motion[1] * t,
        )
        return replace(self, objects=tuple(o.moved(t) for o in self.objects), camera=cam)


def _grey(rng: np.random.Generator, lo: float, hi: float, tint: float = 0.06) -> tuple[float, float, float]:
    """A low-saturation colour: floors and walls never look like an object colour."""
    v = rng.uniform(lo, hi)
    t = rng.uniform(-tint, tint, size=3)
    return tuple(float(np.clip(v + c, 0.0, 1.0)) for c in t)


def project(camera: Camera, point: np.ndarray, fov_deg: float) -> tuple[float, float]:
    """World point -> normalised image coords (u right, v down), both in [0, 1] when visible."""
    return project_points(camera, np.asarray(point)[None], fov_deg)[0]


def project_points(camera: Camera, points: np.ndarray, fov_deg: float) -> list[tuple[float, float]]:
    """World points (N, 3) -> normalised image coords, one (u, v) per point."""
    right, up, forward = camera.basis()
    rel = points - camera.position()
    depth = rel @ forward
    half = math.tan(math.radians(fov_deg) / 2)
    u = (rel @ right) / (depth * half)
    v = (rel @ up) / (depth * half)
    return [(float(a), float(b)) for a, b in zip((u + 1) / 2, (1 - v) / 2, strict=True)]


def sample_scene(params: WorldParams, rng: np.random.Generator, n_objects: int | None = None) -> Scene:
    """Draw one scene: objects with distinct colours, separated on screen, camera and looks."""
    camera = Camera(
        yaw=float(rng.uniform(-0.35, 0.35)),
        pitch=float(rng.uniform(0.42, 0.62)),
        distance=float(rng.uniform(4.2, 5.0)),
    )
    a = _grey(rng, 0.35, 0.75)
    b = tuple(float(np.clip(c * rng.uniform(0.6, 0.85), 0, 1)) for c in a)
    top = _grey(rng, 0.55, 0.9)
    bottom = tuple(float(c * rng.uniform(0.7, 0.95)) for c in top)
    az, el = rng.uniform(-1.0, 1.0), rng.uniform(0.6, 1.1)
    light = np.array([math.sin(az) * math.cos(el), math.sin(el), math.cos(az) * math.cos(el)])
    appearance = Appearance(
        floor_a=a,
        floor_b=b,
        floor_pattern=str(rng.choice(FLOOR_PATTERNS)),
        floor_scale=float(rng.uniform(0.5, 1.2)),
        wall_top=top,
        wall_bottom=bottom,
        light=tuple(float(c) for c in light / np.linalg.norm(light)),
    )
    n = n_objects or int(rng.integers(params.min_objects, params.max_objects + 1))
    colours = rng.choice(len(COLOUR_NAMES), size=n, replace=False)
    shapes = rng.integers(0, len(SHAPES), size=n)
    sizes = rng.integers(0, len(SIZES), size=n)
    radii = np.array(list(SIZES.values()))[sizes] * rng.uniform(0.9, 1.1, size=n)
    yaws = rng.uniform(0, math.pi / 2, size=n)
    velocities = rng.uniform(-0.04, 0.04, size=(n, 2))
    for _ in range(500):
        # One x band per object keeps them apart on screen, so few draws are rejected.
        xs = (rng.permutation(n) + rng.uniform(0.1, 0.9, size=n)) / n * 3.2 - 1.6
        zs = rng.uniform(-1.0, 1.0, size=n)
        objects = [
            SceneObject(
                shape=SHAPES[shapes[i]],
                colour=COLOUR_NAMES[colours[i]],
                size=list(SIZES)[sizes[i]],
                radius=float(radii[i]),
                x=float(xs[i]),
                z=float(zs[i]),
                yaw=float(yaws[i]),
                velocity=(float(velocities[i, 0]), float(velocities[i, 1])),
            )
            for i in range(n)
        ]
        if _well_placed(objects, camera, params):
            break
    else:  # pragma: no cover - 500 failures in a row does not happen with these ranges
        raise RuntimeError("could not place objects")
    return Scene(
        objects=tuple(objects),
        camera=camera,
        appearance=appearance,
        camera_motion=(float(rng.uniform(-0.02, 0.02)), float(rng.uniform(-0.02, 0.02))),
        caption_style=int(rng.integers(0, 1 << 16)),
    )


def _well_placed(objects: list[SceneObject], camera: Camera, params: WorldParams) -> bool:
    uv = project_points(camera, np.stack([o.centre() for o in objects]), params.fov_deg)
    if not all(0.14 < u < 0.86 and 0.2 < v < 0.85 for u, v in uv):
        return False
    us = [u for u, _ in uv]
    for i in range(len(objects)):
        for j in range(i + 1, len(objects)):
            a, b = objects[i], objects[j]
            if math.hypot(a.x - b.x, a.z - b.z) < 1.15 * (a.radius + b.radius) + 0.1:
                return False
            if abs(us[i] - us[j]) < params.min_separation:
                return False
    return True


def left_to_right(scene: Scene, fov_deg: float) -> list[int]:
    """Indices of the scene's objects ordered by their projected centre, left first."""
    us = [u for u, _ in project_points(scene.camera, np.stack([o.centre() for o in scene.objects]), fov_deg)]
    return sorted(range(len(us)), key=us.__getitem__)


def _phrase(o: SceneObject, with_size: bool) -> str:
    return f"{o.size} {o.colour} {o.shape}" if with_size else f"{o.colour} {o.shape}"


def _article(words: str) -> str:
    return "an" if words[0] in "aeiou" else "a"


def caption(scene: Scene, fov_deg: float) -> str:
    """A natural English caption with left/right relations, paraphrased by `scene.caption_style`."""
    style = np.random.default_rng(scene.caption_style)
    order = [scene.objects[i] for i in left_to_right(scene, fov_deg)]
    with_size = bool(style.random() < 0.6)
    ph = [_phrase(o, with_size) for o in order]
    np_ = [f"{_article(p)} {p}" for p in ph]
    if len(order) == 1:
        templates = ["{0}", "{0} on the floor", "a single {1}", "one {1} in the room", "a picture of {0}"]
        return str(style.choice(templates)).format(np_[0], ph[0])
    if len(order) == 2:
        templates = [
            "{0} to the left of {1}",
            "{1} to the right of {0}",
            "{0} left of {1}",
            "{1} right of {0}",
            "{0} and {1}, the {2} on the left",
            "{0} next to {1}, which is on the right",
        ]
        return str(style.choice(templates)).format(np_[0], np_[1], f"{order[0].colour} {order[0].shape}")
    templates = [
        "{0}, {1} and {2} from left to right",
        "from left to right: {0}, {1} and {2}",
        "{1} between {0} on the left and {2} on the right",
        "{0} on the left, {1} in the middle and {2} on the right",
    ]
    return str(style.choice(templates)).format(*np_)
