"""kinema.distill.v1.Distill: few-step sampling with LADD students of the denoiser."""
