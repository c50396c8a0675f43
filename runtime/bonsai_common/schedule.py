"""Klein's sigma/timestep schedule, reproduced in numpy from diffusers 0.42.1.

`Flux2KleinPipeline.__call__` passes sigmas = linspace(1, 1/steps, steps) and mu = compute_empirical_mu(...) to
`FlowMatchEulerDiscreteScheduler.set_timesteps`. numpy follows the same float32 arithmetic as the scheduler
(which itself computes in numpy float32 before converting to torch), so the values agree bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """diffusers.pipelines.flux2.pipeline_flux2_klein.compute_empirical_mu (the resolution/steps dependent shift)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return float(a * num_steps + b)


def _time_shift(config: Mapping[str, Any], mu: float, t: np.ndarray) -> np.ndarray:
    kind = config.get("time_shift_type", "exponential")
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)
    if kind == "linear":
        return mu / (mu + (1 / t - 1) ** 1.0)
    raise ValueError(f"unknown time_shift_type {kind!r}")


def flow_match_schedule(
    num_steps: int, image_seq_len: int, scheduler_config: Mapping[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas float32 [steps + 1] ending in the terminal value, timesteps float32 [steps]) as diffusers sets them.

    `image_seq_len` is the number of latent tokens, (height // 16) · (width // 16).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    for unsupported in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas"):
        if scheduler_config.get(unsupported):
            raise NotImplementedError(f"scheduler option {unsupported} is not supported")
    train_steps = scheduler_config.get("num_train_timesteps", 1000)
    sigmas = np.array(np.linspace(1.0, 1 / num_steps, num_steps)).astype(np.float32)
    if scheduler_config.get("use_dynamic_shifting", False):
        mu = compute_empirical_mu(image_seq_len=image_seq_len, num_steps=num_steps)
        sigmas = _time_shift(scheduler_config, mu, sigmas)
    else:
        shift = scheduler_config.get("shift", 1.0)
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    shift_terminal = scheduler_config.get("shift_terminal")
    if shift_terminal:
        one_minus_z = 1 - sigmas
        scale_factor = one_minus_z[-1] / (1 - shift_terminal)
        sigmas = 1 - (one_minus_z / scale_factor)
    sigmas = sigmas.astype(np.float32)
    if scheduler_config.get("invert_sigmas", False):
        sigmas = (1.0 - sigmas).astype(np.float32)
        timesteps = (sigmas * np.float32(train_steps)).astype(np.float32)
        terminal = np.ones(1, dtype=np.float32)
    else:
        timesteps = (sigmas * np.float32(train_steps)).astype(np.float32)
        terminal = np.zeros(1, dtype=np.float32)
    return np.concatenate([sigmas, terminal]), timesteps
