"""Pipelines written once over capability protocols; embedded and served modes share them."""

from kinema.pipelines.image_to_image import ImageToImageRequest, image_to_image
from kinema.pipelines.inpaint import InpaintRequest, inpaint
from kinema.pipelines.text_to_image import TextToImageRequest, TextToImageResult, text_to_image

__all__ = [
    "ImageToImageRequest",
    "InpaintRequest",
    "TextToImageRequest",
    "TextToImageResult",
    "image_to_image",
    "inpaint",
    "text_to_image",
]
