"""flora.devices: which device and precision a run gets, on every branch reachable without a GPU
(CUDA and MPS are simulated by patching torch's probes; scripts/gpu-check.sh runs the real ones)."""

from __future__ import annotations

import pytest
import torch

from flora import devices
from flora.config import RunConfig, TrainConfig, config_from_dict
from flora.devices import autocast_context, grad_scaler, resolve_device, resolve_precision
from flora.errors import FloraError


@pytest.fixture
def no_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch sees two CUDA GPUs of compute capability 8.0 (bf16)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake A100")


# --- devices ----------------------------------------------------------------------------------


def test_auto_is_the_cpu_without_an_accelerator(no_accelerator: None) -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_prefers_cuda_then_mps(monkeypatch: pytest.MonkeyPatch, two_gpus: None) -> None:
    assert resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    assert resolve_device("mps") == torch.device("mps")


def test_named_gpus_resolve(two_gpus: None) -> None:
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_a_missing_gpu_is_a_clear_error(no_accelerator: None) -> None:
    with pytest.raises(FloraError, match=r"device = 'cuda' but torch sees no CUDA GPU.*'cpu'"):
        resolve_device("cuda")
    with pytest.raises(FloraError, match=r"train.device = 'mps' but this torch sees no Apple GPU"):
        resolve_device("mps")


def test_a_gpu_index_past_the_last_is_refused(two_gpus: None) -> None:
    with pytest.raises(FloraError, match=r"'cuda:2' but this machine has 2 CUDA GPU.*cuda:1"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cuda:", "CPU", ""])
def test_unknown_device_names_are_refused(spec: str, two_gpus: None) -> None:
    with pytest.raises(FloraError, match=r"train.device = .*'cuda'"):
        resolve_device(spec)


def test_the_key_in_the_message_is_the_callers(no_accelerator: None) -> None:
    with pytest.raises(FloraError, match=r"^--device = 'cuda'"):
        resolve_device("cuda", "--device")


# --- precision --------------------------------------------------------------------------------


def test_auto_precision_on_the_cpu_follows_its_bf16_support(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(devices, "_native_bf16", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(devices, "_native_bf16", lambda: False)
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("fp16", "cpu") == "fp16"
    assert resolve_precision("bf16", "cpu") == "bf16"


def test_auto_precision_on_a_gpu(monkeypatch: pytest.MonkeyPatch, two_gpus: None) -> None:
    assert resolve_precision("auto", "cuda:0") == "bf16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert resolve_precision("auto", "cuda:0") == "fp16"  # a T4: fp16 with a grad scaler
    assert resolve_precision("fp32", "cuda:0") == "fp32"
    with pytest.raises(FloraError, match=r"'bf16' but cuda:0 \(Fake A100\) has no native bf16"):
        resolve_precision("bf16", "cuda:0")


def test_auto_precision_on_mps_is_fp32() -> None:
    assert resolve_precision("auto", "mps") == "fp32"


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_a_low_precision_base_runs_in_its_own_precision(dtype: str) -> None:
    assert resolve_precision("auto", "cpu", dtype) == dtype


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)],
)
def test_autocast_sets_the_matmul_dtype(precision: str, dtype: torch.dtype) -> None:
    x = torch.ones(2, 2)
    with autocast_context(precision, "cpu"):
        y = x @ x
    assert y.dtype == dtype


def test_only_fp16_scales_the_gradients() -> None:
    assert grad_scaler("fp16", "cpu").is_enabled()
    assert not grad_scaler("bf16", "cpu").is_enabled()
    assert not grad_scaler("fp32", "cpu").is_enabled()


# --- the config's side ------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:3", "mps"])
def test_train_device_accepts_the_documented_names(device: str) -> None:
    assert TrainConfig(device=device).device == device


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:a", "tpu"])
def test_train_device_refuses_others(device: str) -> None:
    with pytest.raises(FloraError, match=r"train.device must be 'auto', 'cpu', 'cuda', 'cuda:N'"):
        TrainConfig(device=device)


def test_a_bf16_base_needs_a_matching_precision() -> None:
    with pytest.raises(FloraError, match=r"train.precision = 'fp32' with model.dtype = 'bf16'"):
        config_from_dict({"model": {"dtype": "bf16"}, "train": {"precision": "fp32"}})
    assert config_from_dict({"model": {"dtype": "bf16"}, "train": {"precision": "auto"}})


def test_model_fields_are_checked() -> None:
    with pytest.raises(FloraError, match=r"model.dtype must be one of"):
        config_from_dict({"model": {"dtype": "int8"}})
    with pytest.raises(FloraError, match=r"model.quantization must be 0 \(none\), 4"):
        config_from_dict({"model": {"quantization": 2}})
    with pytest.raises(FloraError, match=r"model.exact_merge = false needs model.quantization"):
        config_from_dict({"model": {"quantization": 4, "exact_merge": False}})


def test_flower_gpus_follow_the_device(
    monkeypatch: pytest.MonkeyPatch, no_accelerator: None
) -> None:
    from flora.flower.sim import backend_config

    cpu = backend_config(RunConfig())
    assert cpu["client_resources"] == {"num_cpus": 1, "num_gpus": 0.0}
    assert cpu["init_args"]["num_gpus"] == 0
    asked = config_from_dict({"flower": {"client_gpus": 0.5}})
    with pytest.raises(FloraError, match=r"flower.client_gpus = 0.5 but train.device = 'auto'"):
        backend_config(asked)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    gpu = backend_config(RunConfig())
    assert gpu["client_resources"]["num_gpus"] == 1.0 and gpu["init_args"]["num_gpus"] == 2
    assert backend_config(asked, 2)["client_resources"] == {"num_cpus": 2, "num_gpus": 0.5}
    with pytest.raises(FloraError, match=r"client_gpus = 3.0 but this machine has 2"):
        backend_config(config_from_dict({"flower": {"client_gpus": 3.0}}))


# --- GPU defaults (issue 25): a bf16 base with fp32 targets, TF32, stated attention -------------


def test_a_cuda_run_defaults_to_bf16_with_a_bf16_base(two_gpus: None) -> None:
    config = RunConfig()  # every default
    assert config.train.precision == "auto" and config.model.dtype == "auto"
    cuda = resolve_device("auto")
    assert resolve_precision(config.train.precision, cuda, config.model.dtype) == "bf16"
    assert devices.resolve_base_dtype(config.model.dtype, cuda, config.train.precision) == "bf16"
    # fp32 asked for: the base stays fp32 too
    assert devices.resolve_base_dtype("auto", cuda, "fp32") == "fp32"


def test_an_older_gpu_trains_in_fp16_over_an_fp32_base(
    monkeypatch: pytest.MonkeyPatch, two_gpus: None
) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    cuda = resolve_device("auto")
    assert resolve_precision("auto", cuda, "auto") == "fp16"
    assert devices.resolve_base_dtype("auto", cuda, "auto") == "fp32"


def test_the_cpu_keeps_an_fp32_base_by_default(no_accelerator: None) -> None:
    assert devices.resolve_base_dtype("auto", resolve_device("auto"), "auto") == "fp32"
    assert devices.resolve_base_dtype("bf16", "cpu", "auto") == "bf16"  # as asked


def test_tf32_is_enabled_on_cuda_only() -> None:
    matmul, cpu = torch.backends.cuda.matmul, torch.get_float32_matmul_precision()
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "ieee"
        assert devices.enable_tf32("cpu", True) is False and matmul.fp32_precision == "ieee"
        assert devices.enable_tf32("cuda:0", True) is True
        assert matmul.fp32_precision == "tf32"
        assert devices.enable_tf32("cuda:0", False) is False and matmul.fp32_precision == "ieee"
    finally:
        matmul.fp32_precision = before
    assert torch.get_float32_matmul_precision() == cpu


def test_attention_is_sdpa_unless_flash_attention_can_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    assert devices.resolve_attention("auto", "cpu", "bf16") == "sdpa"
    assert devices.resolve_attention("eager", "cuda:0", "bf16") == "eager"
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: object() if name == "flash_attn" else real(name)
    )
    assert devices.resolve_attention("auto", "cuda:0", "bf16") == "flash_attention_2"
    assert devices.resolve_attention("auto", "cuda:0", "fp32") == "sdpa"  # its kernels need half
    with pytest.raises(FloraError, match="model.attention"):
        devices.resolve_attention("flash", "cpu", "fp32")


def test_the_dry_run_of_a_cuda_config_states_the_gpu_defaults(
    two_gpus: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from flora.cli import main

    sets = ["train.precision=auto", "eval.samples=0", "data.limit=60", "data.heldout=8"]
    args = [a for s in sets for a in ("--set", s)]
    assert main(["run", "configs/tiny.toml", "--dry-run", *args]) == 0
    out = capsys.readouterr().out
    expected = (
        "device cuda:0, precision bf16, base bf16 (target modules fp32), attention sdpa, tf32 on"
    )
    assert expected in out


def test_the_peak_memory_probe_reads_the_runs_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from flora.memory import peak_memory

    seen: list[object] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.cuda, "reset_peak_memory_stats", lambda d=None: seen.append(("reset", d))
    )
    monkeypatch.setattr(
        torch.cuda, "max_memory_allocated", lambda d=None: seen.append(("peak", d)) or 2**21
    )
    with peak_memory(device="cuda:1") as record:
        pass
    assert seen == [("reset", torch.device("cuda", 1)), ("peak", torch.device("cuda", 1))]
    assert record.cuda_mib == 2.0
    seen.clear()
    with peak_memory(device="cpu") as record:  # a CPU run reads no GPU, even where one is
        pass
    assert seen == [] and record.cuda_mib is None


def test_the_deterministic_option_turns_torchs_deterministic_algorithms_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    from flora import simulation
    from flora.config import load_config

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    sets = [
        "eval.samples=0",
        "data.limit=40",
        "data.heldout=8",
        "data.max_length=48",
        "train.max_steps=1",
        "federation.rounds=1",
        "threads=1",
    ]
    try:
        runs = []
        for name in ("a", "b"):
            config = load_config("configs/tiny.toml", [*sets, "train.deterministic=true"])
            simulation.run(config, tmp_path / name, quiet=True)
            assert torch.are_deterministic_algorithms_enabled()
            runs.append((tmp_path / name / "final" / "model" / "model.safetensors").read_bytes())
        assert runs[0] == runs[1]  # the same model, bitwise
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
