"""Kinema: rectified-flow image and video synthesis, embedded or served."""

__version__ = "0.1.0"
