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
  methods that average one global LoRA (fedit, ffa-lora, rolora, fedsvd).

``epsilon`` > 0 asks for that budget at ``delta`` after the run's last round, and the noise
multiplier is found for it (opacus' ``get_noise_multiplier``); ``epsilon = 0`` takes
``noise_multiplier`` as given and reports the epsilon it spends. ``noise_multiplier = 0`` clips
without noise: no privacy (epsilon is infinite), the ablation that separates what clipping
costs from what noise costs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from flora.errors import need


class TrainSettings(Protocol):
    """What :func:`dp_sgd_refusal` reads of a ``flora.config.TrainConfig`` (typed here, so that
    this section of the config does not import the config that imports it)."""

    sampling: str
    loss_weighting: str
    gradient_checkpointing: bool
    precision: str
    packing: bool


__all__ = ["ACCOUNTANTS", "PRIVACY_MODES", "PrivacyConfig", "TrainSettings", "dp_sgd_refusal"]

PRIVACY_MODES = ("none", "dp-sgd", "client-level")
ACCOUNTANTS = ("rdp", "prv")  # opacus' Renyi DP and privacy-loss-random-variable accountants


@dataclass
class PrivacyConfig:
    """Differential privacy: which kind a run gives, and its parameters (docs/privacy.md)."""

    mode: str = field(
        default="none",
        metadata={
            "help": '"none", "dp-sgd" (every example\'s gradient clipped and noised on the '
            'client; every method) or "client-level" (each client\'s update clipped, noise on the '
            "average; fedit, ffa-lora, rolora, fedsvd)"
        },
    )
    epsilon: float = field(
        default=0.0,
        metadata={
            "help": "the target budget after the last round (the noise multiplier is found for "
            "it); 0: no target, noise_multiplier as given"
        },
    )
    noise_multiplier: float = field(
        default=1.0,
        metadata={
            "help": "the Gaussian noise's standard deviation over the clipping norm, with epsilon "
            "= 0 (0: clipping without noise, no privacy)"
        },
    )
    max_grad_norm: float = field(
        default=1.0,
        metadata={
            "help": "dp-sgd: every example's gradient (all trainable LoRA factors "
            "together) is clipped to this"
        },
    )
    update_norm: float = field(
        default=0.05,
        metadata={
            "help": "client-level: every client's update of the global LoRA (all modules together) "
            "is clipped to this L2 norm"
        },
    )
    delta: float = field(
        default=0.0,
        metadata={
            "help": "the delta of the (epsilon, delta) guarantee; 0: 1 / n, n the client's "
            "examples (dp-sgd) or the number of clients (client-level)"
        },
    )
    accountant: str = field(
        default="rdp",
        metadata={
            "help": 'opacus\' accountant: "rdp" (Renyi DP) or "prv" (privacy loss random variables)'
        },
    )
    reproducible_noise: bool = field(
        default=False,
        metadata={
            "help": "false: the noise comes from a secret seed drawn on the machine that adds "
            "it, so nobody who knows the run's seed can subtract it; true: from the run's "
            "seed (reproducible runs, for experiments only: the server, and every client, "
            "could recompute the noise)"
        },
    )

    def __post_init__(self) -> None:
        need(self.mode in PRIVACY_MODES, "privacy.mode", self.mode, f"one of {PRIVACY_MODES}")
        need(self.epsilon >= 0, "privacy.epsilon", self.epsilon, "> 0 (a target), or 0 (no target)")
        need(self.noise_multiplier >= 0, "privacy.noise_multiplier", self.noise_multiplier, ">= 0")
        need(self.max_grad_norm > 0, "privacy.max_grad_norm", self.max_grad_norm, "> 0")
        need(self.update_norm > 0, "privacy.update_norm", self.update_norm, "> 0")
        need(0 <= self.delta < 1, "privacy.delta", self.delta, "in [0, 1) (0: 1/n)")
        need(
            self.accountant in ACCOUNTANTS,
            "privacy.accountant",
            self.accountant,
            f"one of {ACCOUNTANTS}",
        )

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def delta_for(self, units: int) -> float:
        """The delta for ``units`` protected units (examples or clients): set, or 1 / units."""
        return self.delta if self.delta > 0 else 1.0 / max(1, units)


def dp_sgd_refusal(train: TrainSettings, base_dtype: str = "fp32") -> str | None:
    """Why DP-SGD cannot train with ``train`` on a base held in ``base_dtype``, or None.

    The one statement of what ``privacy.mode = "dp-sgd"`` refuses, read when the config loads
    (``train.precision`` as written) and by ``flora.training.train_client`` (the precision
    resolved for the device).
    """
    for key, value, needed in (
        ("sampling", train.sampling, "poisson"),
        ("loss_weighting", train.loss_weighting, "examples"),
    ):
        if value not in ("auto", needed):
            return (
                f"train.{key} = {value!r} with privacy.mode = 'dp-sgd': DP-SGD's accounting "
                f"needs {needed!r}; set train.{key} = 'auto'"
            )
    if train.gradient_checkpointing:
        return (
            "train.gradient_checkpointing with privacy.mode = 'dp-sgd': opacus' per-example "
            "hooks would see each recomputed forward twice; set "
            "train.gradient_checkpointing = false"
        )
    if train.packing:
        return (
            "train.packing with privacy.mode = 'dp-sgd': DP-SGD clips each example's gradient, "
            "and a packed row holds several examples; set train.packing = false"
        )
    fp16 = "the gradient scaler's loss scale would be clipped with the gradients"
    if train.precision == "fp16":
        return (
            f"train.precision = 'fp16' with privacy.mode = 'dp-sgd': DP-SGD does not train in "
            f"fp16 ({fp16}); use 'bf16' or 'fp32' ('auto' picks fp16 on a GPU without bf16)"
        )
    if train.precision == "auto" and base_dtype == "fp16":
        return (
            "model.dtype = 'fp16' with privacy.mode = 'dp-sgd': train.precision = 'auto' "
            f"trains an fp16 base in fp16, and DP-SGD does not train in fp16 ({fp16}); use "
            "model.dtype = 'bf16' or 'fp32'"
        )
    return None
