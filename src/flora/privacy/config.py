"""The ``[privacy]`` section: which differential privacy a run gives, and its parameters.

Two modes besides ``"none"``:

- ``"dp-sgd"``: sample-level DP on every client (Abadi et al., 2016, arXiv:1607.00133). Each
  local step clips every example's gradient of the trainable LoRA factors to ``max_grad_norm``
  and adds Gaussian noise of ``noise_multiplier * max_grad_norm`` to their sum; batches are
  Poisson samples (each example with probability batch / n). What the client uploads is
  post-processing of that training, so it holds for every aggregation method.
- ``"client-level"``: DP-FedAvg (McMahan et al., 2018, arXiv:1710.06963), as Flower's
  client-side fixed-clipping strategy does it: each client clips its update of the global LoRA
  to ``update_norm`` on the client, the server averages them with equal weights and adds
  Gaussian noise of ``noise_multiplier * update_norm / m`` (m accepted clients). Only for the
  methods that average one global LoRA (fedit, ffa-lora).

``epsilon`` > 0 asks for that budget at ``delta`` after the run's last round, and the noise
multiplier is found for it (opacus' ``get_noise_multiplier``); ``epsilon = 0`` takes
``noise_multiplier`` as given and reports the epsilon it spends. ``noise_multiplier = 0`` clips
without noise: no privacy (epsilon is infinite), the ablation that separates what clipping
costs from what noise costs.
"""

from __future__ import annotations

from dataclasses import dataclass

from flora.errors import need

__all__ = ["ACCOUNTANTS", "PRIVACY_MODES", "PrivacyConfig"]

PRIVACY_MODES = ("none", "dp-sgd", "client-level")
ACCOUNTANTS = ("rdp", "prv")  # opacus' Renyi DP and privacy-loss-random-variable accountants


@dataclass
class PrivacyConfig:
    # "none", "dp-sgd" (every example's gradient clipped and noised on the client; every method)
    # or "client-level" (each client's update clipped, noise on the average; fedit, ffa-lora)
    mode: str = "none"
    # the target budget after the last round (the noise is found for it); 0: use noise_multiplier
    epsilon: float = 0.0
    # the Gaussian noise's standard deviation over the clipping norm (with epsilon = 0)
    noise_multiplier: float = 1.0
    # dp-sgd: every example's gradient (all trainable LoRA factors together) is clipped to this
    max_grad_norm: float = 1.0
    # client-level: every client's update of the global LoRA (all modules together) is clipped
    # to this L2 norm
    update_norm: float = 0.05
    # 0: 1 / n, n the client's examples (dp-sgd) or the number of clients (client-level)
    delta: float = 0.0
    accountant: str = "rdp"  # "rdp" or "prv" (opacus)
    # false: the noise comes from a secret seed drawn on the machine that adds it, so nobody who
    # knows the run's seed can subtract it; true: from the run's seed (reproducible runs, for
    # experiments only: the server, and every client, could recompute the noise)
    reproducible_noise: bool = False

    def __post_init__(self) -> None:
        need(self.mode in PRIVACY_MODES, "privacy.mode", self.mode, f"one of {PRIVACY_MODES}")
        need(self.epsilon >= 0, "privacy.epsilon", self.epsilon, "> 0 (a target), or 0 (no target)")
        need(self.noise_multiplier >= 0, "privacy.noise_multiplier", self.noise_multiplier, ">= 0")
        need(self.max_grad_norm > 0, "privacy.max_grad_norm", self.max_grad_norm, "> 0")
        need(self.update_norm > 0, "privacy.update_norm", self.update_norm, "> 0")
        need(0 <= self.delta < 1, "privacy.delta", self.delta, "in [0, 1) (0: 1/n)")
        need(self.accountant in ACCOUNTANTS, "privacy.accountant", self.accountant,
             f"one of {ACCOUNTANTS}")  # fmt: skip

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def delta_for(self, units: int) -> float:
        """The delta for ``units`` protected units (examples or clients): set, or 1 / units."""
        return self.delta if self.delta > 0 else 1.0 / max(1, units)
