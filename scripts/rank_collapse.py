"""FlexLoRA's rank collapse and raFLoRA's fix, on a tiny example (issue 24; seconds, pure tensors).

    python scripts/rank_collapse.py        # docs/results/rank_collapse.md and .png

Eight clients of ranks [8, 4, 2, 2, 1, 1, 1, 1], equal weights, one 48 x 40 module. The global
LoRA starts with 8 components of equal energy. Each round every client starts from its download
(the global LoRA truncated to its rank) and returns it plus a small update of its own rank
(``noise``: 0 = no training, the pure effect of the aggregation weights; 0.05 = a little
training); the server aggregates with flexlora or raflora. Reported: the share of the global
update's energy (squared singular values) beyond the smallest rank (1), per round. FlexLoRA
weights component i by the clients covering it (sum of their p_k < 1 for i > 1), so that share
falls geometrically; raFLoRA renormalises each rank partition and keeps it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from flora.aggregation import aggregate  # noqa: E402
from flora.aggregation.lowrank import lowrank_svd  # noqa: E402
from flora.factors import LoraFactors  # noqa: E402

RANKS = [8, 4, 2, 2, 1, 1, 1, 1]
ROUNDS = 10
OUT, IN = 48, 40


def energy_beyond(lora: LoraFactors, rank: int) -> float:
    _, S, _ = lowrank_svd(lora.B, lora.A)
    return float(S[rank:].square().sum() / S.square().sum())


def run(method: str, noise: float) -> list[float]:
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(OUT, 8, generator=g))
    P, _ = torch.linalg.qr(torch.randn(IN, 8, generator=g))
    start = LoraFactors(P.T.contiguous(), Q.contiguous(), 1.0)
    downloads = [{"m": LoraFactors(start.A[:r], start.B[:, :r], 1.0)} for r in RANKS]
    shares = [energy_beyond(start, min(RANKS))]
    for _ in range(ROUNDS):
        uploads = []
        for d in downloads:
            f = d["m"]
            A = f.A + noise * torch.randn(f.A.shape, generator=g)
            B = f.B + noise * torch.randn(f.B.shape, generator=g)
            uploads.append({"m": LoraFactors(A, B, 1.0)})
        result = aggregate(method, uploads, [1.0] * len(RANKS))
        downloads = result.client_factors
        shares.append(energy_beyond(result.global_factors["m"], min(RANKS)))
    return shares


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {(m, n): run(m, n) for n in (0.0, 0.05) for m in ("flexlora", "raflora")}
    lines = [
        "# Rank collapse on a tiny example (scripts/rank_collapse.py)",
        "",
        f"Ranks {RANKS}, equal weights, one {OUT} x {IN} module, a start of 8 equal components. "
        "Share of the global update's energy beyond rank 1 (the smallest), by round:",
        "",
        "| round | " + " | ".join(f"{m} (noise {n})" for m, n in curves) + " |",
        "|---" * (len(curves) + 1) + "|",
    ]
    for t in range(ROUNDS + 1):
        lines.append(f"| {t} | " + " | ".join(f"{c[t]:.2e}" for c in curves.values()) + " |")
    out = ROOT / "docs" / "results"
    (out / "rank_collapse.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for (m, n), c in curves.items():
        ax.plot(range(ROUNDS + 1), c, "-" if m == "raflora" else "--", label=f"{m}, noise {n}")
    ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel("energy beyond the smallest rank (share)")
    ax.set_title(f"rank collapse: ranks {RANKS}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "rank_collapse.png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
