"""kinema.denoiser.v1.Denoiser: the sampling loop (schedule, sampler, CFG), one Triton call per step."""
