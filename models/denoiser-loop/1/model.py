"""Triton python-backend model: a denoiser's sampling loop next to its network (decoupled).

initialize / execute / finalize only; the loop and its glue live once in the library
(kinema.inference.triton_sampler), shared with the denoiser service.
"""

import triton_python_backend_utils as pb_utils

from kinema.inference import triton_sampler


class TritonPythonModel:
    def initialize(self, args):
        self.model = triton_sampler.SamplerModel(args, pb_utils)

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        self.model.finalize()
