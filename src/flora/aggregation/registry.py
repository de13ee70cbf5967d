"""The method registry: what each aggregation method is, what it needs, and its options.

Torch-free on purpose: the config, the CLI's ``--help`` and ``flora aggregate``'s flags read it
without importing torch. ``Method.run`` imports the method's own module on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flora.errors import FloraError

__all__ = ["METHODS", "Method", "Option", "get_method"]


@dataclass(frozen=True)
class Option:
    """One keyword option of a method: how the config, the CLI and the maths see it."""

    name: str
    type: type  # float, int, str or bool
    default: Any
    help: str  # one line, for `flora aggregate --help` and config errors
    choices: tuple[Any, ...] = ()  # the allowed values, where they are few
    check: Callable[[Any], bool] | None = None  # a further test of the value
    expected: str = ""  # what ``check`` wants, for the error message

    def validate(self, value: Any, where: str) -> Any:
        """``value`` as this option's type, or FloraError naming ``where`` and the fix."""
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.type) or (self.type is not bool and isinstance(value, bool)):
            raise FloraError(f"{where}={value!r}: expected a {self.type.__name__} ({self.help})")
        if self.choices and value not in self.choices:
            raise FloraError(f"{where}={value!r} is unknown; use one of {self.choices}")
        if self.check is not None and not self.check(value):
            raise FloraError(f"{where}={value!r} is out of range; pick {self.expected}")
        return value


@dataclass(frozen=True)
class Method:
    """A registered aggregation method and the facts the engine, the config and the CLI need."""

    name: str
    module: str  # flora.aggregation.<module> holds its ``aggregate``
    exact: bool  # realised update == sum_k p_k s_k B_k A_k
    mixed_ranks: bool  # accepts clients of different ranks
    keeps_global_lora: bool  # clients continue from the global LoRA (else merged into W)
    paper: str
    summary: str  # one line for `flora aggregate --help`
    freezes_A: bool = False  # clients train B only, over the shared A of the global LoRA
    options: tuple[Option, ...] = ()
    # why client-level DP (privacy.mode = "client-level") does not apply; "" where it does: the
    # methods that average one global LoRA, whose clipped updates' mean takes Gaussian noise
    client_dp_refusal: str = ""
    # its aggregate checks the uploads' values for NaN/inf itself, in its one pass over them
    # (flora.aggregation.aggregate then checks only their structure)
    checks_values: bool = False
    # reproduces a published implementation's defect (the study's evidence), not a method to use
    defect: bool = False

    @property
    def client_dp(self) -> bool:
        """Client-level DP (clip each update, noise on the equal-weight mean) applies."""
        return not self.client_dp_refusal

    @property
    def merges_into_base(self) -> bool:
        """Each round's update goes into the base weights; clients start fresh LoRAs."""
        return not self.keeps_global_lora

    @property
    def run(self) -> Callable[..., Any]:
        """The method's pure ``aggregate(clients, weights, **options)``."""
        return importlib.import_module(f"flora.aggregation.{self.module}").aggregate

    def option(self, name: str) -> Option:
        for option in self.options:
            if option.name == name:
                return option
        valid = ", ".join(o.name for o in self.options) or "none"
        raise FloraError(f"{self.name}: unknown option '{name}' (valid options: {valid})")

    def resolve(self, given: Mapping[str, Any], where: str = "") -> dict[str, Any]:
        """Every option's value: ``given`` checked against the method, defaults for the rest.

        ``where`` prefixes the option name in errors (e.g. "federation.options.").
        """
        names = {o.name for o in self.options}
        for name in given:
            if name in names:
                continue
            if not where:
                self.option(name)  # raises: "<method>: unknown option ..."
            valid = ", ".join(o.name for o in self.options) or "none"
            raise FloraError(
                f"{where}{name} is not an option of {self.name} (its options: {valid}); "
                "drop it or choose the method it belongs to"
            )
        return {
            o.name: o.validate(given[o.name], f"{where}{o.name}") if o.name in given else o.default
            for o in self.options
        }


_TAU = Option(
    "tau", float, 0.9, "florist: energy share of the singular values to keep, in (0, 1]; 1 is "
    "exact", check=lambda v: 0.0 < v <= 1.0, expected="0 < tau <= 1 (1 is exact)",
)  # fmt: skip
_ENERGY = Option(
    "energy", str, "sum", "florist: energy of sigma_i: 'sum' (sigma) or 'squared' (sigma^2)",
    choices=("sum", "squared"),
)  # fmt: skip
_STACKING = ("the server stacks every client's own factors unnoised and sends them all to every "
             "client, so noise on an aggregate would hide nothing; stacking cannot sit behind "
             "secure aggregation either")  # fmt: skip
_SUMMED = ("the server takes each client's product B_k A_k into an SVD and sends every client its "
           "own truncation, so there is no one average to add calibrated noise to")  # fmt: skip
_WEIGHTING = Option(
    "weighting", str, "examples", "zero-padding: client weights, 'examples' (p_k) or HetLoRA's "
    "'norm' (||s_k B_k A_k||_F)", choices=("examples", "norm"),
)  # fmt: skip

_MERGE_SCALING = Option(
    "merge_scaling", float, 16.0, "reference-zero-padding: the merge's LoRA scaling over the "
    "clients' (16 as published up to October 2024; 1 keeps only the p_k^2 defect)",
    check=lambda v: v > 0.0, expected="a scaling above 0",
)  # fmt: skip
_REPRODUCTION = ("it reproduces a defect of the FLoRA reference code for the study's comparison; "
                 "use the faithful method instead")  # fmt: skip

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("flora", "flora", True, True, False, "Wang et al., NeurIPS 2024",
               "stacking, exact, mixed ranks; global rank = sum of client ranks",
               client_dp_refusal=_STACKING, checks_values=True),
        Method("fedit", "fedit", False, False, True, "Zhang et al., ICASSP 2024",
               "FedAvg of A and B separately; equal ranks; not exact"),
        Method("zero-padding", "zero_padding", False, True, True, "Cho et al., EMNLP 2024",
               "HetLoRA: pad to max rank, average, truncate per client (writes clients/)",
               options=(_WEIGHTING,),
               client_dp_refusal="it pads and weights factors of different ranks (by examples "
               "or by norm), which flora's equal-weight client-level accounting does not cover"),
        Method("flexlora", "flexlora", False, True, True, "Bai et al., NeurIPS 2024",
               "SVD of the exact sum, truncated per client (writes clients/)",
               client_dp_refusal=_SUMMED),
        Method("ffa-lora", "ffa_lora", True, False, True, "Sun et al., ICLR 2024",
               "shared frozen A, averaged B; equal ranks; exact given the shared A",
               freezes_A=True),
        Method("fedex-lora", "fedex_lora", True, False, False, "Singhal et al., 2025",
               "FedIT plus a dense residual for the base weights (writes residual.safetensors)",
               client_dp_refusal="its dense residual is computed from every client's own "
               "factors and merged into the base unnoised"),
        Method("florist", "florist", False, True, False, "Ramesh and Dass, 2025",
               "stacking + singular value thresholding at tau; exact at tau=1",
               options=(_TAU, _ENERGY), client_dp_refusal=_STACKING),
        Method("reference-fedit", "reference_fedit", False, False, True,
               "FLoRA reference code (ATP-1010/FederatedLLM)",
               "DEFECT REPRODUCTION: the published FedIT keeps client 0's adapter times p_0",
               client_dp_refusal=_REPRODUCTION, defect=True),
        Method("reference-zero-padding", "reference_zero_padding", False, True, False,
               "FLoRA reference code (ATP-1010/FederatedLLM)",
               "DEFECT REPRODUCTION: the published zero-padding, p_k on both factors, merged "
               "at 16x the clients' scaling", options=(_MERGE_SCALING,),
               client_dp_refusal=_REPRODUCTION, defect=True),
    )
}  # fmt: skip


def get_method(name: str) -> Method:
    """The registered method ``name``, or a FloraError listing the valid names."""
    try:
        return METHODS[name]
    except KeyError:
        raise FloraError(
            f"method '{name}' is unknown; choose one of: {', '.join(METHODS)}"
        ) from None
