"""Ray-cast renderer for the synthetic world: RGB, exact depth, instance masks and motion.

Every pixel casts one ray through a pinhole camera; primitives are intersected analytically, so
depth is exact (distance along the camera's forward axis) and motion can be reprojected exactly.
Numpy only, vectorised over pixels: a 64 px frame takes about a millisecond.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kinema.data.scene import COLOURS, Camera, Scene, SceneObject

WALL_Z = -3.2  # the back wall plane
AMBIENT = 0.38
_EPS = 1e-6


@dataclass(frozen=True)
class Frame:
    rgb: np.ndarray  # (H, W, 3) float32 in [0, 1]
    depth: np.ndarray  # (H, W) float32, distance along the camera axis
    instances: np.ndarray  # (H, W) uint8, 0 = floor/wall, k + 1 = scene object k
    points: np.ndarray  # (H, W, 3) float32 world position of each pixel's surface


def camera_rays(camera: Camera, resolution: int, fov_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """(origin (3,), unit directions (H*W, 3)) for pixel centres, row-major from the top left."""
    right, up, forward = camera.basis()
    half = math.tan(math.radians(fov_deg) / 2)
    s = (np.arange(resolution) + 0.5) / resolution * 2 - 1  # (W,)
    u, v = np.meshgrid(s * half, -s * half)  # (H, W) each
    d = forward + u.reshape(-1, 1) * right + v.reshape(-1, 1) * up  # (P, 3)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return camera.position(), d


def _hit_sphere(o: np.ndarray, d: np.ndarray, obj: SceneObject) -> tuple[np.ndarray, np.ndarray]:
    c = np.array([obj.x, obj.radius, obj.z])
    oc = o - c  # (3,) or (P, 3)
    b = (d * oc).sum(-1)
    cc = (oc * oc).sum(-1) - obj.radius**2
    disc = b * b - cc
    t = -b - np.sqrt(np.maximum(disc, 0.0))
    t = np.where((disc > 0) & (t > _EPS), t, np.inf)
    p = o + t[:, None] * d
    return t, (p - c) / obj.radius


def _hit_cube(o: np.ndarray, d: np.ndarray, obj: SceneObject) -> tuple[np.ndarray, np.ndarray]:
    cy, sy = math.cos(obj.yaw), math.sin(obj.yaw)
    rot = np.array([[cy, 0, -sy], [0, 1, 0], [sy, 0, cy]])  # world -> object frame
    c = np.array([obj.x, obj.radius, obj.z])
    lo = np.atleast_2d(o - c) @ rot.T
    ld = d @ rot.T
    inv = 1.0 / np.where(np.abs(ld) < _EPS, _EPS, ld)
    t1 = (-obj.radius - lo) * inv
    t2 = (obj.radius - lo) * inv
    tmin = np.minimum(t1, t2)
    tnear = tmin.max(-1)
    tfar = np.maximum(t1, t2).min(-1)
    t = np.where((tnear <= tfar) & (tnear > _EPS), tnear, np.inf)
    axis = tmin.argmax(-1)
    n_local = np.zeros_like(ld)
    n_local[np.arange(len(ld)), axis] = -np.sign(ld[np.arange(len(ld)), axis])
    return t, n_local @ rot


def _hit_cone(o: np.ndarray, d: np.ndarray, obj: SceneObject) -> tuple[np.ndarray, np.ndarray]:
    h, r = obj.height, obj.radius
    apex = np.array([obj.x, h, obj.z])
    k2 = (r / h) ** 2
    co = o - apex
    # Infinite cone (x^2 + z^2) = k2 * y^2 about the apex, clipped to -h <= y <= 0.
    a = d[:, 0] ** 2 + d[:, 2] ** 2 - k2 * d[:, 1] ** 2
    b = 2 * ((d[..., 0] * co[..., 0]) + (d[..., 2] * co[..., 2]) - k2 * d[..., 1] * co[..., 1])
    c = co[..., 0] ** 2 + co[..., 2] ** 2 - k2 * co[..., 1] ** 2
    a = np.where(np.abs(a) < _EPS, _EPS, a)
    disc = b * b - 4 * a * c
    sq = np.sqrt(np.maximum(disc, 0.0))
    t = np.full(len(d), np.inf)
    for root in ((-b - sq) / (2 * a), (-b + sq) / (2 * a)):
        y = co[..., 1] + root * d[:, 1]
        ok = (disc > 0) & (root > _EPS) & (y <= 0) & (y >= -h) & (root < t)
        t = np.where(ok, root, t)
    p = co + np.where(np.isfinite(t), t, 0)[:, None] * d
    n = np.stack([p[:, 0], -k2 * p[:, 1], p[:, 2]], -1)
    n /= np.linalg.norm(n, axis=1, keepdims=True) + _EPS
    return t, n


_HITTERS = {"sphere": _hit_sphere, "cube": _hit_cube, "cone": _hit_cone}


def _floor_texture(p: np.ndarray, scene: Scene) -> np.ndarray:
    app = scene.appearance
    a, b = np.asarray(app.floor_a), np.asarray(app.floor_b)
    if app.floor_pattern == "checker":
        sel = (np.floor(p[:, 0] / app.floor_scale) + np.floor(p[:, 2] / app.floor_scale)) % 2
    elif app.floor_pattern == "stripes":
        sel = np.floor(p[:, 0] / (0.5 * app.floor_scale)) % 2
    else:
        sel = np.zeros(len(p))
    return np.where(sel[:, None] > 0, b, a)


def render(scene: Scene, resolution: int, fov_deg: float) -> Frame:
    """Render one frame of `scene`."""
    origin, d = camera_rays(scene.camera, resolution, fov_deg)
    n_pix = len(d)
    t_best = np.full(n_pix, np.inf)
    inst = np.zeros(n_pix, dtype=np.uint8)
    normal = np.zeros((n_pix, 3))
    for k, obj in enumerate(scene.objects):
        t, n = _HITTERS[obj.shape](origin, d, obj)
        closer = t < t_best
        t_best = np.where(closer, t, t_best)
        inst[closer] = k + 1
        normal[closer] = n[closer]

    # Floor (y = 0) then the back wall (z = WALL_Z) behind everything else.
    t_floor = np.where(d[:, 1] < -_EPS, -origin[1] / np.minimum(d[:, 1], -_EPS), np.inf)
    t_wall = np.where(d[:, 2] < -_EPS, (WALL_Z - origin[2]) / np.minimum(d[:, 2], -_EPS), np.inf)
    floor_hit = (t_floor < t_best) & (t_floor < t_wall)
    wall_hit = ~floor_hit & (t_wall < t_best)
    t_best = np.where(floor_hit, t_floor, np.where(wall_hit, t_wall, t_best))
    # A ray that escapes both planes (camera yawed far round) sees the wall colour at the horizon.
    t_best = np.where(np.isfinite(t_best), t_best, 50.0)
    points = origin + t_best[:, None] * d

    light = np.asarray(scene.appearance.light)
    rgb = np.empty((n_pix, 3))
    obj_px = inst > 0
    if obj_px.any():
        base = np.array([COLOURS[o.colour] for o in scene.objects])[inst[obj_px] - 1]
        n = normal[obj_px]
        lam = np.clip(n @ light, 0.0, 1.0)
        half = light - d[obj_px]
        half /= np.linalg.norm(half, axis=1, keepdims=True)
        spec = np.clip((n * half).sum(1), 0, 1) ** 24 * 0.25
        rgb[obj_px] = base * (AMBIENT + (1 - AMBIENT) * lam[:, None]) + spec[:, None]
    if floor_hit.any():
        fp = points[floor_hit]
        col = _floor_texture(fp, scene)
        lit = np.ones(len(fp))
        for obj in scene.objects:  # shadow rays from the floor towards the light
            t, _ = _HITTERS[obj.shape](fp + 1e-4 * light, np.broadcast_to(light, fp.shape), obj)
            lit = np.where(np.isfinite(t), 0.45, lit)
        fade = np.exp(-0.04 * np.maximum(t_best[floor_hit] - 3.0, 0))
        rgb[floor_hit] = col * (0.55 + 0.45 * lit[:, None]) * fade[:, None]
    rest = ~obj_px & ~floor_hit
    if rest.any():
        h = np.clip(points[rest, 1] / 3.0, 0, 1)[:, None]
        top, bottom = np.asarray(scene.appearance.wall_top), np.asarray(scene.appearance.wall_bottom)
        rgb[rest] = bottom * (1 - h) + top * h

    forward = scene.camera.basis()[2]
    depth = (points - origin) @ forward
    hw = (resolution, resolution)
    return Frame(
        rgb=np.clip(rgb, 0, 1).reshape(*hw, 3).astype(np.float32),
        depth=depth.reshape(hw).astype(np.float32),
        instances=inst.reshape(hw),
        points=points.reshape(*hw, 3).astype(np.float32),
    )


def forward_flow(scene: Scene, t: int, frame: Frame, resolution: int, fov_deg: float) -> np.ndarray:
    """Exact forward motion (H, W, 2) in pixels (dx, dy) from frame t to t + 1.

    Each pixel's surface point moves with its object (floor and wall are static) and is
    reprojected through the next frame's camera; occlusion at t + 1 is not modelled, as in the
    usual ground-truth forward flow.
    """
    now, nxt = scene.at_frame(t), scene.at_frame(t + 1)
    p = frame.points.reshape(-1, 3).astype(np.float64)
    inst = frame.instances.reshape(-1)
    vel = np.zeros((len(now.objects) + 1, 3))
    for k, obj in enumerate(now.objects):
        vel[k + 1] = (obj.velocity[0], 0.0, obj.velocity[1])
    p_next = p + vel[inst]

    def to_pixels(cam: Camera, pts: np.ndarray) -> np.ndarray:
        right, up, fwd = cam.basis()
        rel = pts - cam.position()
        z = rel @ fwd
        half = math.tan(math.radians(fov_deg) / 2)
        u = (rel @ right) / (z * half)
        v = (rel @ up) / (z * half)
        return np.stack([(u + 1) / 2 * resolution - 0.5, (1 - v) / 2 * resolution - 0.5], -1)

    flow = to_pixels(nxt.camera, p_next) - to_pixels(now.camera, p)
    return flow.reshape(resolution, resolution, 2).astype(np.float32)
