"""Rectified-flow sampling: time schedules, ODE samplers and guidance (SD3, Esser et al. 2024)."""

from kinema.sampling.guidance import cfg_velocity
from kinema.sampling.samplers import initial_noise, sample_euler, sample_heun
from kinema.sampling.schedule import get_schedule, logit_normal_t, resolution_shift, shift_sigmas
from kinema.sampling.student import sample_student, student_schedule, student_timesteps
from kinema.sampling.temporal import sample_video, temporal_guidance_velocity, video_schedule

__all__ = [
    "cfg_velocity",
    "get_schedule",
    "initial_noise",
    "logit_normal_t",
    "resolution_shift",
    "sample_euler",
    "sample_heun",
    "sample_student",
    "sample_video",
    "shift_sigmas",
    "student_schedule",
    "student_timesteps",
    "temporal_guidance_velocity",
    "video_schedule",
]
