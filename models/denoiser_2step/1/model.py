"""Triton python-backend model: the 4-step LADD student, served as the denoiser network of kinema.inference.networks.

initialize / execute / finalize only, the same file as models/denoiser/1/model.py (deliberate: Triton needs one
per model folder); config.pbtxt's `network` parameter names the class, so this folder's name may differ.
"""

import triton_python_backend_utils as pb_utils

from kinema.inference import triton_python

NETWORK = "denoiser"


class TritonPythonModel:
    def initialize(self, args):
        self.network = triton_python.build(NETWORK, args)

    def execute(self, requests):
        return triton_python.execute(self.network, requests, pb_utils)

    def finalize(self):
        self.network = None
