"""The synthetic world every Kinema model trains and is judged on."""

from kinema.data.scene import COLOUR_NAMES, COLOURS, SHAPES, Scene, WorldParams
from kinema.data.world import Clip, ObjectLabel, Sample, World, cached_images

__all__ = [
    "COLOURS",
    "COLOUR_NAMES",
    "SHAPES",
    "Clip",
    "ObjectLabel",
    "Sample",
    "Scene",
    "World",
    "WorldParams",
    "cached_images",
]
