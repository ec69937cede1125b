"""Evaluation harness: attribute probe, FID, image metrics, flow-matching validation loss and reports."""
