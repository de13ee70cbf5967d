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

__all__ = ["METHODS", "Method", "Option", "get_method", "register"]


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
    """A registered aggregation method and the facts the engine, the config and the CLI need.

    What its clients train and what its server keeps is the method's own: the ``LIFECYCLE`` of
    its module (flora.aggregation.lifecycle; FLoRA's merge-each-round where it defines none).
    """

    name: str
    module: str  # flora.aggregation.<module> (or a dotted path) holds ``aggregate``, ``LIFECYCLE``
    exact: bool  # realised update == sum_k p_k s_k B_k A_k
    mixed_ranks: bool  # accepts clients of different ranks
    paper: str
    summary: str  # one line for `flora aggregate --help`
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

    def _code(self) -> Any:
        path = self.module if "." in self.module else f"flora.aggregation.{self.module}"
        return importlib.import_module(path)

    @property
    def run(self) -> Callable[..., Any]:
        """The method's pure ``aggregate(clients, weights, **options)``."""
        return self._code().aggregate

    @property
    def lifecycle(self) -> Any:
        """Its :class:`flora.aggregation.lifecycle.Lifecycle` at its options' defaults."""
        return self.lifecycle_for({})

    def lifecycle_for(self, options: Mapping[str, Any]) -> Any:
        """Its :class:`flora.aggregation.lifecycle.Lifecycle`: what clients train, what the
        server keeps, what each client downloads (imports torch). A module's ``LIFECYCLE`` is
        one, or a function of the method's resolved options that makes one."""
        from flora.aggregation.lifecycle import Lifecycle, MergeEachRound

        made = getattr(self._code(), "LIFECYCLE", None) or MergeEachRound()
        if isinstance(made, Lifecycle):
            return made
        return made(**self.resolve(options))

    @property
    def keeps_global_lora(self) -> bool:
        """Its server keeps a LoRA that the global model applies (imports torch)."""
        from flora.aggregation.lifecycle import GlobalLora

        return isinstance(self.lifecycle, GlobalLora)

    @property
    def merges_into_base(self) -> bool:
        """Each round's update goes into the base weights; clients start fresh LoRAs."""
        return not self.keeps_global_lora

    @property
    def freezes_A(self) -> bool:
        """Its clients train B over a frozen A every round (imports torch)."""
        return "A" not in self.lifecycle.trains

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
    name="tau",
    type=float,
    default=0.9,
    help="florist: energy share of the singular values to keep, in (0, 1]; 1 is exact",
    check=lambda v: 0.0 < v <= 1.0,
    expected="0 < tau <= 1 (1 is exact)",
)
_ENERGY = Option(
    name="energy",
    type=str,
    default="sum",
    help="florist: energy of sigma_i: 'sum' (sigma) or 'squared' (sigma^2)",
    choices=("sum", "squared"),
)
_WEIGHTING = Option(
    name="weighting",
    type=str,
    default="examples",
    help="zero-padding: client weights, 'examples' (p_k) or HetLoRA's 'norm' (||s_k B_k A_k||_F)",
    choices=("examples", "norm"),
)
_MERGE_SCALING = Option(
    name="merge_scaling",
    type=float,
    default=16.0,
    help="reference-zero-padding: the merge's LoRA scaling over the clients' (16 as published "
    "up to October 2024; 1 keeps only the p_k^2 defect)",
    check=lambda v: v > 0.0,
    expected="a scaling above 0",
)
_BUDGET = Option(
    name="budget",
    type=int,
    default=0,
    help="flora-warm: ranks of (o + i) a client downloads a round, its warm init included "
    "(0: unbounded, nothing carried)",
    check=lambda v: v >= 0,
    expected="0 (unbounded) or more than the largest client rank",
)
_WARM = Option(
    name="warm",
    type=bool,
    default=True,
    help="flora-warm: start each client from the top components of the last merged update "
    "(false: FLoRA's fresh LoRAs)",
)
_DOWNLINK = Option(
    name="downlink",
    type=str,
    default="fp32",
    help="flora-warm: the merged update's factors on the wire, 'fp32', 'fp16' or 'bf16' (half "
    "the bytes) or 'int8' (a power-of-two scale per component: a quarter); the rounding is "
    "carried",
    choices=("fp32", "fp16", "bf16", "int8"),
)
_RESIDUAL = Option(
    name="residual",
    type=float,
    default=1.0,
    help="fedmomentum: share of the residual components' energy (squared singular values) "
    "merged into the base each round, in (0, 1]; 1 merges all and is exact",
    check=lambda v: 0.0 < v <= 1.0,
    expected="0 < residual <= 1 (1 is exact)",
)
_SPLIT = Option(
    name="split",
    type=str,
    default="balanced",
    help="fedmomentum: how each kept component's singular value splits between the next LoRA's "
    "factors: balanced (B = U sqrt(S), A = sqrt(S) Vh) or svd (B = U S, A = Vh, as flexlora)",
    choices=("balanced", "svd"),
)
_LAM = Option(
    name="lam",
    type=float,
    default=0.0,
    help="lora-fair: ridge weight of B's correction, relative to tr(A A^T) / r; 0 is the "
    "least-squares correction, larger stays nearer FedIT's B",
    check=lambda v: v >= 0.0,
    expected="lam >= 0 (0: least squares)",
)
_ROBUST = Option(
    name="robust",
    type=str,
    default="mean",
    help="fedit, ffa-lora: 'mean' (weighted by examples), or the unweighted coordinate-wise "
    "'median' or 'trimmed-mean' of the factors, against hostile clients",
    choices=("mean", "median", "trimmed-mean"),
)
_TRIM = Option(
    name="trim",
    type=float,
    default=0.2,
    help="fedit, ffa-lora with robust = 'trimmed-mean': the share of clients dropped at each "
    "end of every coordinate, floor(trim K) (Flower's FedTrimmedAvg default 0.2)",
    check=lambda v: 0.0 <= v < 0.5,
    expected="0 <= trim < 0.5",
)
_STACKING = (
    "the server stacks every client's own factors unnoised and sends them all to every "
    "client, so noise on an aggregate would hide nothing; stacking cannot sit behind "
    "secure aggregation either"
)
_SUMMED = (
    "the server takes each client's product B_k A_k into an SVD and sends every client its "
    "own truncation, so there is no one average to add calibrated noise to"
)
_REPRODUCTION = (
    "it reproduces a defect of the FLoRA reference code for the study's comparison; "
    "use the faithful method instead"
)
_REFERENCE = "FLoRA reference code (ATP-1010/FederatedLLM)"

METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (a name already taken is refused); returns it."""
    if method.name in METHODS:
        raise FloraError(f"method '{method.name}' is registered already; pick another name")
    METHODS[method.name] = method
    return method


for _method in (
    Method(
        name="flora",
        module="flora",
        exact=True,
        mixed_ranks=True,
        paper="Wang et al., NeurIPS 2024",
        summary="stacking, exact, mixed ranks; global rank = sum of client ranks",
        client_dp_refusal=_STACKING,
        checks_values=True,
    ),
    Method(
        name="flora-warm",
        module="flora_warm",
        exact=True,
        mixed_ranks=True,
        paper="flora's own (FLoRA stacking, Wang et al., NeurIPS 2024, warm and bounded)",
        summary="stacking, exact (base + carried remainder), warm-started clients, downlink "
        "bounded by budget",
        options=(_BUDGET, _WARM, _DOWNLINK),
        client_dp_refusal=_STACKING,
        checks_values=True,
    ),
    Method(
        name="fedit",
        module="fedit",
        exact=False,
        mixed_ranks=False,
        paper="Zhang et al., ICASSP 2024",
        summary="FedAvg of A and B separately; equal ranks; not exact",
        options=(_ROBUST, _TRIM),
    ),
    Method(
        name="zero-padding",
        module="zero_padding",
        exact=False,
        mixed_ranks=True,
        paper="Cho et al., EMNLP 2024",
        summary="HetLoRA: pad to max rank, average, truncate per client (writes clients/)",
        options=(_WEIGHTING,),
        client_dp_refusal="it pads and weights factors of different ranks (by examples or by "
        "norm), which flora's equal-weight client-level accounting does not cover",
    ),
    Method(
        name="flexlora",
        module="flexlora",
        exact=False,
        mixed_ranks=True,
        paper="Bai et al., NeurIPS 2024",
        summary="SVD of the exact sum, truncated per client (writes clients/)",
        client_dp_refusal=_SUMMED,
    ),
    Method(
        name="raflora",
        module="raflora",
        exact=False,
        mixed_ranks=True,
        paper="Wu et al., arXiv:2602.13486, 2026",
        summary="FlexLoRA with each rank partition weighted by the clients covering it (no rank "
        "collapse); SVD truncated per client (writes clients/)",
        client_dp_refusal=_SUMMED,
    ),
    Method(
        name="ffa-lora",
        module="ffa_lora",
        exact=True,
        mixed_ranks=False,
        paper="Sun et al., ICLR 2024",
        summary="shared frozen A, averaged B; equal ranks; exact given the shared A",
        options=(_ROBUST, _TRIM),
    ),
    Method(
        name="rolora",
        module="rolora",
        exact=True,
        mixed_ranks=False,
        paper="Chen et al., NeurIPS 2025",
        summary="alternating: B trained over a frozen A in odd rounds, A under a frozen B in "
        "even ones, the trained factor averaged; equal ranks; exact; half the upload",
    ),
    Method(
        name="fedsvd",
        module="fedsvd",
        exact=True,
        mixed_ranks=False,
        paper="Lee et al., NeurIPS 2025",
        summary="B trained over the global A and averaged, then re-factored by SVD into an "
        "orthonormal A; equal ranks; exact",
    ),
    Method(
        name="fedmomentum",
        module="fedmomentum",
        exact=True,
        mixed_ranks=False,
        paper="Yan et al., arXiv:2603.08014, 2026",
        summary="exact aggregate's top-r SVD components as the next global LoRA (no "
        "re-initialisation), the residual merged into the base; equal ranks; exact at "
        "residual = 1",
        options=(_RESIDUAL, _SPLIT),
        client_dp_refusal=_STACKING,
        checks_values=True,
    ),
    Method(
        name="fed-plora",
        module="fed_plora",
        exact=False,
        mixed_ranks=True,
        paper="Zhang et al., ICLR 2026",
        summary="R parallel rank-1 modules: each client trains a random r_k of them over the "
        "others folded into its weights (starts from the global model), each averaged over "
        "its trainers; R (out + in) down",
        client_dp_refusal="each rank-1 component is averaged over the clients that drew it, a "
        "different set per component and round, so no one average takes one calibrated noise",
    ),
    Method(
        name="fed-sb",
        module="fed_sb",
        exact=True,
        mixed_ranks=False,
        paper="Singhal et al., arXiv:2502.15436, 2025",
        summary="EXPERIMENTAL: frozen A, B from round 1's exact update (its SVD), only an r x r "
        "core trained and averaged after it; equal ranks; exact; r^2 per module each way",
        client_dp_refusal="its clients start from the global core between A and B, which the "
        "clip's reference (the sent factors) does not hold; not built yet (DP-SGD applies)",
    ),
    Method(
        name="lora-fair",
        module="lora_fair",
        exact=False,
        mixed_ranks=False,
        paper="Bian et al., ICCV 2025",
        summary="FedIT's averages with B corrected towards the exact aggregate (ridge "
        "least squares, lam); equal ranks; noise at most FedIT's",
        options=(_LAM,),
        client_dp_refusal="its correction of B is computed from every client's own product "
        "B_k A_k, not from one average that noise could cover",
    ),
    Method(
        name="fedex-lora",
        module="fedex_lora",
        exact=True,
        mixed_ranks=False,
        paper="Singhal et al., 2025",
        summary="FedIT plus a dense residual for the base weights (writes residual.safetensors)",
        client_dp_refusal="its dense residual is computed from every client's own factors and "
        "merged into the base unnoised",
    ),
    Method(
        name="florist",
        module="florist",
        exact=False,
        mixed_ranks=True,
        paper="Ramesh and Dass, 2025",
        summary="stacking + singular value thresholding at tau; exact at tau=1",
        options=(_TAU, _ENERGY),
        client_dp_refusal=_STACKING,
    ),
    Method(
        name="reference-fedit",
        module="reference_fedit",
        exact=False,
        mixed_ranks=False,
        paper=_REFERENCE,
        summary="DEFECT REPRODUCTION: the published FedIT keeps client 0's adapter times p_0",
        client_dp_refusal=_REPRODUCTION,
        defect=True,
    ),
    Method(
        name="reference-zero-padding",
        module="reference_zero_padding",
        exact=False,
        mixed_ranks=True,
        paper=_REFERENCE,
        summary="DEFECT REPRODUCTION: the published zero-padding, p_k on both factors, merged "
        "at 16x the clients' scaling",
        options=(_MERGE_SCALING,),
        client_dp_refusal=_REPRODUCTION,
        defect=True,
    ),
):
    register(_method)


def get_method(name: str) -> Method:
    """The registered method ``name``, or a FloraError listing the valid names."""
    try:
        return METHODS[name]
    except KeyError:
        raise FloraError(
            f"method '{name}' is unknown; choose one of: {', '.join(METHODS)}"
        ) from None
