"""A client node's state between rounds: its base model and its data partition, on disk.

Any runtime whose clients hold their own copy of the base uses it (Flower's nodes; a test's
thread-pool runtime). A SuperNode starts a fresh ClientApp process for every message, so what a
client must remember across rounds lives in a directory per run and partition::

    <state dir>/run-<run key>/partition-<k>/base-<n>.safetensors

``base-<n>`` holds the target modules' weights after the first ``n`` merged updates of the run
(the history of merged updates: flora, florist, fedex-lora), written only after a
round's training succeeded. The snapshot the server last assumed (``since``) is kept too, so a
reply lost after the write can be retried. Everything else of the model comes from flora's
model cache (:func:`flora.models.load_model`), and the encoded partition from
``<state dir>/data/<key>/``, written once by the first message that needs it. Within one
process (a Ray simulation worker, a `flora flower-worker`) the model and data stay in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flora.client import ClientData
from flora.config import RunConfig
from flora.data.federated import run_data
from flora.errors import FloraError
from flora.io import atomic_write, atomic_write_json
from flora.models import load_run_model, with_default_targets
from flora.protocol import ClientTask
from flora.weights import merge_update, module_weight, target_shapes

__all__ = [
    "RESYNC",
    "ClientBase",
    "NodeBase",
    "clear_caches",
    "load_base",
    "load_data",
]

RESYNC = "flora-resync"  # in an error reply: this node's base is gone, start it from W0
_SNAPSHOT = re.compile(r"^base-(\d+)\.safetensors$")


@dataclass
class ClientBase:
    """The model a client trains on, set to its partition's base."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    targets: list[str]  # module names whose weights the snapshots hold
    pristine: dict[str, torch.Tensor]  # their weights as loaded: snapshot 0

    def weights(self) -> dict[str, torch.Tensor]:
        return {m: module_weight(self.model, m) for m in self.targets}

    def restore(self, directory: Path, synced: int) -> None:
        """Set the target weights to the snapshot after ``synced`` merged updates."""
        if synced == 0:
            saved = self.pristine
        else:
            path = directory / f"base-{synced}.safetensors"
            if not path.is_file():
                raise FloraError(
                    f"{directory} holds no base after {synced} merged updates; the node lost "
                    f"its state ({RESYNC}: the server resends every update next time)"
                )
            saved = load_file(str(path))
        with torch.no_grad():
            for module, weight in self.weights().items():
                weight.copy_(saved[module])

    def save(self, directory: Path, synced: int, keep_from: int) -> None:
        """Write snapshot ``synced`` atomically; drop those older than ``keep_from``."""
        tensors = {m: w.contiguous() for m, w in self.weights().items()}
        atomic_write(
            directory / f"base-{synced}.safetensors", lambda tmp: save_file(tensors, str(tmp))
        )
        for path in directory.glob("base-*.safetensors"):
            match = _SNAPSHOT.match(path.name)
            if match and int(match[1]) < keep_from:
                path.unlink(missing_ok=True)


@dataclass
class NodeBase:
    """A node's base for one message: the cached model and the node's snapshot directory."""

    base: ClientBase
    directory: Path

    @property
    def model(self) -> PreTrainedModel:
        return self.base.model

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.base.tokenizer

    def catch_up(self, task: ClientTask) -> None:
        """Restore the snapshot the server assumed (``since``), then merge what it missed."""
        self.base.restore(self.directory, task.since)
        for update in task.catch_up:  # W += B A (+ R), in order: bitwise as the server's copy
            merge_update(self.base.model, update)

    def store(self, task: ClientTask) -> None:
        """After a success only: a crash before this leaves the base the server falls back to."""
        if task.through != task.since:
            self.base.save(self.directory, task.through, keep_from=task.since)


_MODELS: dict[tuple[object, ...], ClientBase] = {}


def clear_caches() -> None:
    """Forget the in-process model and data (a simulation worker keeps them between messages)."""
    _MODELS.clear()
    _DATA.clear()


def load_base(config: RunConfig, device: str | None = None) -> ClientBase:
    """The run's base model at snapshot 0 on ``device`` (None: ``train.device``), cached per
    process; ``restore`` moves it."""
    config = with_default_targets(config)
    m = config.model
    key = (
        m.name,
        config.seed,
        device or config.train.device,
        m.dtype,
        m.quantization,
        m.exact_merge,
        tuple(m.target_modules),
    )
    if key not in _MODELS:
        _MODELS.clear()  # one model per process
        model, tokenizer = load_run_model(config, device)
        targets = sorted(target_shapes(model, m.target_modules))
        # snapshot 0 on the CPU: no second copy of the target weights on the device
        pristine = {m: module_weight(model, m).cpu().clone() for m in targets}
        _MODELS[key] = ClientBase(model, tokenizer, targets, pristine)
    return _MODELS[key]


_DATA: dict[tuple[str, int], ClientData] = {}


def _data_key(config: RunConfig) -> str:
    fed = config.federation
    spec = {
        "data": dataclasses.asdict(config.data),
        "seed": config.seed,
        "model": config.model.name,  # the tokenizer
        "clients": 1 if fed.centralized else fed.num_clients,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def load_data(
    config: RunConfig, partition: int, tokenizer: PreTrainedTokenizerBase, state_dir: Path
) -> ClientData:
    """Partition ``partition`` of the run's data, exactly as the embedded runtime splits it."""
    key = _data_key(config)
    if (key, partition) in _DATA:
        return _DATA[(key, partition)]
    path = state_dir / "data" / key / f"partition-{partition}.json"
    data = None
    if path.is_file():
        try:
            data = ClientData(**json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError, RecursionError):
            data = None  # a damaged cache: made again below from the run's data
    if data is None:
        full = run_data(config, tokenizer)
        if not 0 <= partition < len(full.clients):
            raise FloraError(
                f"partition-id {partition} is outside the run's {len(full.clients)} clients; "
                "set the node's partition-id in 0..num_clients-1"
            )
        data = ClientData(full.clients[partition], full.heldout, full.heldout_records)
        atomic_write_json(path, dataclasses.asdict(data))
    _DATA[(key, partition)] = data
    return data
