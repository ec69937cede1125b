"""Triton python-backend model: the iin network from kinema.inference.networks.

initialize / execute / finalize only; the numpy-level network and the request glue live once in
the library (kinema.inference), shared with in-process serving. Every model.py in this repository
is this same file with its network name (deliberate: Triton needs one per model folder).
"""

import triton_python_backend_utils as pb_utils

from kinema.inference import triton_python

NETWORK = "iin"


class TritonPythonModel:
    def initialize(self, args):
        self.network = triton_python.build(NETWORK, args)

    def execute(self, requests):
        return triton_python.execute(self.network, requests, pb_utils)

    def finalize(self):
        self.network = None
