"""Pipelines written once over capability protocols; embedded and served modes share them."""

from kinema.pipelines.text_to_image import TextToImageRequest, TextToImageResult, text_to_image

__all__ = ["TextToImageRequest", "TextToImageResult", "text_to_image"]
