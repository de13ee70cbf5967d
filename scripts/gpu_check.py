"""The device check: flora on a CUDA GPU against the CPU (run by scripts/gpu-check.sh, offline,
from the carry folder that scripts/gpu_carry.py builds; issue 25).

Every part runs on its own: its result, or its error, goes to ``<out>/<part>.json`` as soon as it
ends, and ``<out>/gpu-check.json`` gathers them; a failing part never stops the others. Models
need no download: flora's tiny ones, and random-weight Llama models of SmolLM2-135M's shape and
of a 1B model's (Llama-3.2-1B's), built from a config with flora's shipped tokenizer.

1. tiny: configs/tiny.toml on CUDA (bf16, the defaults' bf16 base) and on the CPU (fp32): held-out
   loss before and after within a relative 1e-2, both lowering it.
2. throughput: training tokens/s and MFU (6 N tokens/s over the GPU's dense bf16 peak: the usual
   convention, which counts the frozen base's weight gradients that LoRA never computes) for the
   135M and 1B shapes, at batch sizes 4, 8 and 16 (max_length 128, Dolly), with an fp32 base and a
   bf16 base (fp32 target modules), with and without packing.
3. memory: peak GPU memory of a 135M-shape run at K = 2 and 10 clients: flat (<= 1.10x).
4. quantized: a 4-bit (NF4) base on CUDA trains and lowers the held-out loss (bitsandbytes).
5. privacy: DP-SGD on CUDA (no noise and an unbounded clip equal the non-private run to 1e-3; at
   epsilon 8 the same epsilon rows as on the CPU; client-level DP runs).
6. mmlu: 5-shot MMLU questions per second on CUDA (bf16) against the CPU (fp32), 135M shape.
7. deterministic: two tiny runs with train.deterministic = true on CUDA give the same model
   bitwise.

``--cpu-only`` runs the same code with the CPU in bf16 standing in for the GPU and small shapes:
a self-test of this script (tests/test_gpu_check.py), not a check. Exits 1 if a check fails.
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
FLAT = 1.10  # peak GPU memory at K = 10 over K = 2
PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}  # dense bf16 FLOP/s
SHAPES = {  # the real models' shapes (Llama architecture), random weights
    "135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
}
SELF_TEST_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=49152,
    tie_word_embeddings=True,
)


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


def random_model(shape: dict[str, Any], seed: int = 0) -> Any:
    """A random-weight Llama of ``shape`` with flora's shipped tokenizer (no download)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from flora.tiny_tokenizer import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        **shape,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model, tokenizer


def saved_model(shape: dict[str, Any], folder: Path) -> str:
    """The random model written as a checkpoint directory, for the parts that run a config."""
    if not (folder / "config.json").is_file():
        model, tokenizer = random_model(shape)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return str(folder)


def _examples(tokenizer: Any, count: int, max_length: int = 128) -> list[Any]:
    from flora.data import encode_records, load_records

    records = load_records("dolly", limit=count * 2)
    return encode_records(records, tokenizer, template="chat", max_length=max_length).examples[
        :count
    ]


def throughput(device: str, cuda: bool, shapes: list[str]) -> dict[str, Any]:
    from flora.devices import hold_in
    from flora.training import TrainConfig, train_client

    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = next((v for k, v in PEAKS.items() if k in name), None)
    rows = []
    for label in shapes:
        shape = SHAPES[label] if cuda else SELF_TEST_SHAPE
        for base in ("fp32", "bf16"):
            model, tokenizer = random_model(shape)
            if base == "bf16":
                hold_in(model, "bf16", ["q_proj", "v_proj"])
            model.to(device)
            params = sum(p.numel() for p in model.parameters())
            examples = _examples(tokenizer, 16 * 4)
            for batch in (4, 8, 16):
                for packing in (False, True):
                    config = TrainConfig(
                        batch_size=batch,
                        max_steps=4,
                        precision="bf16",
                        packing=packing,
                        lora_dropout=0.0,
                    )
                    kwargs = dict(
                        rank=16,
                        alpha=32.0,
                        target_modules=["q_proj", "v_proj"],
                        config=config,
                        seed=0,
                        pad_id=int(tokenizer.pad_token_id),
                    )
                    train_client(
                        model,
                        examples[: batch * 2],
                        **{
                            **kwargs,
                            "config": TrainConfig(
                                batch_size=batch, max_steps=1, precision="bf16", packing=packing
                            ),
                        },
                    )
                    if cuda:
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    result = train_client(model, examples, **kwargs)
                    if cuda:
                        torch.cuda.synchronize()
                    seconds = time.perf_counter() - start
                    rate = result.tokens / seconds
                    rows.append(
                        {
                            "shape": label,
                            "base": base,
                            "batch": batch,
                            "packing": packing,
                            "tokens_per_second": rate,
                            "params": params,
                            "mfu": 6 * params * rate / peak if peak else None,
                            "train_loss": result.train_loss,
                        }
                    )
            del model
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    return {"rows": rows, "peak_flops": peak, "mfu_convention": "6 N tokens/s / dense bf16 peak"}


def memory(device: str, cuda: bool, tmp: Path) -> dict[str, Any]:
    folder = saved_model(SHAPES["135m"] if cuda else SELF_TEST_SHAPE, tmp / "model-135m")
    peaks = {}
    for k in (2, 10):
        ranks = [[64, 32, 16, 16, 8, 8, 4, 4, 4, 4][i] for i in range(k)]
        ranks = ranks if cuda else [min(r, 8) for r in ranks]  # the self-test's layers are small
        overrides = [
            f"model.name='{folder}'",
            "model.target_modules=['q_proj', 'v_proj']",
            f"train.device='{device}'",
            f"federation.num_clients={k}",
            f"lora.ranks={ranks}",
            "federation.rounds=1",
            "train.max_steps=1",
            "data.limit=300",
            "data.heldout=16",
            "eval.samples=0",
            "data.max_length=128",
        ]
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        row = _run("configs/tiny.toml", overrides, tmp / f"memory-{k}")
        since_last = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
        client = row["client_peak_cuda_mib"] or float("nan")
        peaks[k] = {"peak_cuda_mib": max(since_last, client), "client_peak_cuda_mib": client}
    ratio = peaks[10]["peak_cuda_mib"] / peaks[2]["peak_cuda_mib"] if cuda else float("nan")
    return {"by_k": peaks, "ratio": ratio, "limit": FLAT, "ok": (ratio <= FLAT) if cuda else None}


def quantized(device: str, cuda: bool, tmp: Path) -> dict[str, Any]:
    if not cuda:
        return {"skipped": "bitsandbytes' 4-bit kernels need CUDA"}
    if importlib.util.find_spec("bitsandbytes") is None:
        return {"skipped": "bitsandbytes is not installed (the carry lacked its wheel)"}
    run = _run(
        "configs/tiny.toml",
        ["model.quantization=4", f"train.device='{device}'", "eval.samples=0"],
        tmp / "quantized",
    )
    return {**run, "ok": run["after"] < run["before"]}


def mmlu(device: str, cuda: bool, tmp: Path) -> dict[str, Any]:
    from flora.evaluation.mmlu import score_mmlu
    from flora.evaluation.mmlu_data import load_mmlu
    from flora.models import load_model

    folder = saved_model(SHAPES["135m"] if cuda else SELF_TEST_SHAPE, tmp / "model-135m")
    test, dev = load_mmlu("test"), load_mmlu("dev")
    out = {}
    for label, where, precision in (("gpu", device, "bf16"), ("cpu", "cpu", "fp32")):
        model, tokenizer = load_model(folder, precision=precision, device=where)
        start = time.perf_counter()
        scores = score_mmlu(
            model,
            tokenizer,
            test,
            dev,
            shots=5,
            limit_per_subject=1,
            batch_size=16,
            precision=precision,
        )
        seconds = time.perf_counter() - start
        out[label] = {
            "questions": scores.questions,
            "seconds": seconds,
            "questions_per_second": scores.questions / seconds,
        }
        del model
    out["ratio"] = out["gpu"]["questions_per_second"] / out["cpu"]["questions_per_second"]
    return out


def deterministic(device: str, tmp: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    models = []
    try:
        for name in ("a", "b"):
            sets = [f"train.device='{device}'", "eval.samples=0", "train.deterministic=true"]
            _run("configs/tiny.toml", sets, tmp / f"det-{name}")
            final = tmp / f"det-{name}" / "final" / "model" / "model.safetensors"
            models.append(load_file(final))
    finally:
        torch.use_deterministic_algorithms(False)  # the setting is the process's
    same = all(torch.equal(models[0][k], models[1][k]) for k in models[0])
    return {"bitwise_equal": same, "ok": same}


PARTS = ["tiny", "throughput", "memory", "quantized", "privacy", "mmlu", "deterministic"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-only", action="store_true", help="self-test without a GPU")
    parser.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS)
    parser.add_argument("--shapes", nargs="+", default=["135m", "1b"], choices=list(SHAPES))
    parser.add_argument("--out", type=Path, default=Path("gpu-check"), help="the results folder")
    args = parser.parse_args(argv)
    cuda = not args.cpu_only
    if cuda and not torch.cuda.is_available():
        print(
            f"gpu-check: torch {torch.__version__} sees no CUDA GPU; nothing to check here "
            "(--cpu-only self-tests this script)"
        )
        return 2
    device = "cuda" if cuda else "cpu"
    gpu = [f"train.device='{device}'", "train.precision='bf16'"]
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (self-test)",
    }
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        for part in args.parts:
            start = time.perf_counter()
            try:
                if part == "tiny":
                    result = tiny(gpu, tmp)
                elif part == "throughput":
                    result = throughput(device, cuda, args.shapes)
                elif part == "memory":
                    result = memory(device, cuda, tmp)
                elif part == "quantized":
                    result = quantized(device, cuda, tmp)
                elif part == "privacy":
                    result = privacy(gpu, tmp)
                elif part == "mmlu":
                    result = mmlu(device, cuda, tmp)
                else:
                    result = deterministic(device, tmp)
            except Exception as error:  # one part's failure is its result; the others go on
                result = {"error": f"{type(error).__name__}: {error}", "ok": False}
            result["seconds"] = time.perf_counter() - start
            report[part] = result
            (args.out / f"{part}.json").write_text(json.dumps(result, indent=2) + "\n")
            (args.out / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")
            print(f"{part}: {json.dumps(result)[:2000]}", flush=True)
    failed = [p for p in args.parts if report[p].get("ok") is False]
    print(
        f"gpu-check on {report['device']}: "
        + ("FAILED " + ", ".join(failed) if failed else "every check that ran passed")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
