"""Numpy-only helpers shared by every Bonsai runtime and by the converter: initial noise, schedule, image checks."""

from .image import is_sane, psnr
from .noise import initial_noise
from .schedule import compute_empirical_mu, flow_match_schedule

__all__ = ["compute_empirical_mu", "flow_match_schedule", "initial_noise", "is_sane", "psnr"]
