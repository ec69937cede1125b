import re

import numpy as np
import pytest

from kinema.data import COLOUR_NAMES, SHAPES, World, WorldParams
from kinema.data.real import HELDOUT_IMAGES, TRAIN_IMAGES, random_crops


@pytest.fixture(scope="module")
def world() -> World:
    return World()


def test_sample_outputs_and_dtypes(world: World) -> None:
    s = world.sample("train", 0)
    assert s.rgb.shape == (64, 64, 3) and s.rgb.dtype == np.float32
    assert s.rgb.min() >= 0.0 and s.rgb.max() <= 1.0
    assert s.depth.shape == (64, 64) and np.all(s.depth > 0)
    assert s.instances.shape == (64, 64)
    assert set(np.unique(s.instances)) <= set(range(len(s.objects) + 1))
    assert 1 <= len(s.objects) <= 3
    for obj in s.objects:
        assert obj.shape in SHAPES and obj.colour in COLOUR_NAMES and obj.size in ("small", "large")


def test_deterministic_from_seed_split_index(world: World) -> None:
    a, b = world.sample("val", 7), World().sample("val", 7)
    np.testing.assert_array_equal(a.rgb, b.rgb)
    assert a.caption == b.caption
    assert not np.array_equal(world.sample("train", 7).rgb, a.rgb)
    assert not np.array_equal(World(WorldParams(seed=1)).sample("val", 7).rgb, a.rgb)


def test_every_object_is_visible_with_its_colour(world: World) -> None:
    from kinema.data.scene import COLOURS

    for i in range(30):
        s = world.sample("test", i)
        for k, obj in enumerate(s.objects):
            px = s.rgb[s.instances == k + 1]
            assert len(px) >= 12, "object too small or hidden"
            mean = px.mean(0) / px.mean(0).max()
            ref = np.asarray(COLOURS[obj.colour]) / max(COLOURS[obj.colour])
            assert np.abs(mean - ref).max() < 0.3


def test_depth_orders_objects_in_front_of_the_floor_behind_them(world: World) -> None:
    s = world.sample("train", 3)
    for k in range(len(s.objects)):
        ys, xs = np.nonzero(s.instances == k + 1)
        top = ys.min()
        # The pixel just above an object's top edge is farther away (wall or floor behind it).
        col = xs[ys == top][0]
        if top > 0 and s.instances[top - 1, col] == 0:
            assert s.depth[top - 1, col] > s.depth[top, col]


def test_caption_names_every_object_and_its_relations(world: World) -> None:
    for i in range(200):
        s = world.sample("train", i)
        for obj in s.objects:
            assert f"{obj.colour}" in s.caption and obj.shape in s.caption
        if len(s.objects) >= 2:
            assert re.search(r"left|right", s.caption)
        left = s.objects[s.left_to_right[0]]
        right = s.objects[s.left_to_right[-1]]
        assert left.image_position[0] <= right.image_position[0]


def test_left_of_caption_matches_the_pixels(world: World) -> None:
    checked = 0
    for i in range(300):
        s = world.sample("train", i)
        m = re.fullmatch(r"an? (?:\w+ )?(\w+) (\w+) (?:to the )?left of an? (?:\w+ )?(\w+) (\w+)", s.caption)
        if not m:
            continue
        colours = [o.colour for o in s.objects]
        a, b = colours.index(m.group(1)) + 1, colours.index(m.group(3)) + 1
        xa = np.nonzero(s.instances == a)[1].mean()
        xb = np.nonzero(s.instances == b)[1].mean()
        assert xa < xb, s.caption
        checked += 1
    assert checked > 10


def test_paraphrase_variety(world: World) -> None:
    captions = {world.sample("train", i).caption for i in range(300)}
    two = [c for c in captions if "right of" in c]
    assert len(two) > 5 and any("left of" in c for c in captions) and any("from left to right" in c for c in captions)


def test_clip_motion_is_consistent_with_the_frames(world: World) -> None:
    clip = world.clip("train", 5, frames=4)
    assert clip.rgb.shape == (4, 64, 64, 3) and clip.flow.shape == (3, 64, 64, 2)
    assert np.abs(clip.flow).max() > 0.05  # camera and objects move
    # Warping frame 1 back along the flow reproduces frame 0 on unoccluded pixels.
    ys, xs = np.mgrid[0:64, 0:64]
    tx = np.clip(np.round(xs + clip.flow[0, ..., 0]).astype(int), 0, 63)
    ty = np.clip(np.round(ys + clip.flow[0, ..., 1]).astype(int), 0, 63)
    same_instance = clip.instances[1][ty, tx] == clip.instances[0]
    err = np.abs(clip.rgb[1][ty, tx] - clip.rgb[0]).mean(-1)[same_instance]
    still = np.abs(clip.rgb[1] - clip.rgb[0]).mean(-1)[same_instance]
    assert np.median(err) < 0.02
    assert err.mean() < still.mean()


def test_resolution_is_configurable() -> None:
    s = World(WorldParams(resolution=32)).sample("train", 0)
    assert s.rgb.shape == (32, 32, 3)
    with pytest.raises(ValueError, match="resolution"):
        WorldParams(resolution=4)


def test_bad_split_and_index(world: World) -> None:
    with pytest.raises(ValueError, match="unknown split"):
        world.sample("holdout", 0)
    with pytest.raises(ValueError, match="index"):
        world.sample("train", -1)


def test_real_sources_are_disjoint_and_crops_have_the_right_shape() -> None:
    assert not set(TRAIN_IMAGES) & set(HELDOUT_IMAGES)
    from kinema.data.real import _skimage

    crops = random_crops((_skimage("chelsea"),), 4, 32, np.random.default_rng(0))
    assert crops.shape == (4, 32, 32, 3) and crops.dtype == np.uint8
