"""A run's data: load, subsample, split off the held-out set, encode, partition across clients."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedTokenizerBase

from flora.data._seed import make_rng
from flora.data.partition import client_table, partition, split_heldout
from flora.data.prompts import Example, KeptCounts, encode_records
from flora.data.shift import shift_to_category
from flora.data.sources import Record, load_records
from flora.errors import FloraError

if TYPE_CHECKING:
    from flora.config import RunConfig

__all__ = ["FederatedData", "prepare_data", "run_data"]


@dataclass
class FederatedData:
    clients: list[list[Example]]  # each client's encoded training examples
    heldout: list[Example]
    heldout_records: list[Record]  # the raw held-out rows (for generation samples)
    table: str  # per-client rows and label mix, then kept rows per category (start of a run)
    counts: dict[str, dict[str, KeptCounts]]  # "train" / "heldout": category -> kept counts

    @property
    def dropped(self) -> int:
        """Examples that could not keep an answer token within max_length."""
        return sum(c.dropped for split in self.counts.values() for c in split.values())

    def counts_row(self) -> dict[str, object]:
        """The metrics.jsonl ``data`` row: kept, shortened and dropped rows per category."""
        return {
            "kind": "data",
            "round": 0,
            **{
                split: {k: c._asdict() for k, c in sorted(counts.items())}
                for split, counts in self.counts.items()
            },
            "dropped": self.dropped,
        }


def prepare_data(
    *,
    source: str,
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    max_length: int,
    limit: int,
    heldout: int,
    scheme: str,
    num_clients: int,
    seed: int,
    label_column: str = "category",
    dirichlet_alpha: float = 0.5,
    shards_per_client: int = 2,
    min_response: int = 32,
    truncation: str = "keep-answer",
    subset: str = "",
    split: str = "train",
    fields: dict[str, str] | None = None,
    natural_id_column: str = "",
    min_partition_size: int = 1,
    classes_per_client: int = 2,
    shift_client: int = -1,
    shift_category: str = "",
) -> FederatedData:
    """Seeded end to end: the same arguments give the same clients and held-out set."""
    records = load_records(
        source,
        subset=subset,
        split=split,
        fields=fields,
        label_column=label_column,
        natural_id_column=natural_id_column,
    )
    if limit and limit < len(records):
        keep = sorted(make_rng(seed, 1).permutation(len(records))[:limit].tolist())
        records = [records[i] for i in keep]
    if heldout >= len(records):
        raise FloraError(f"data.heldout={heldout} leaves no training rows of {len(records)}")
    train_idx, held_idx = split_heldout(len(records), heldout / len(records), seed)
    options = {
        "template": template,
        "max_length": max_length,
        "min_response": min_response,
        "truncation": truncation,
    }
    train_records = [records[i] for i in train_idx]  # each record's "category" is its label
    train = encode_records(train_records, tokenizer, **options)  # type: ignore[arg-type]
    held = encode_records([records[i] for i in held_idx], tokenizer, **options)  # type: ignore[arg-type]
    labels = [example["category"] for example in train.examples]
    if len(train.examples) < num_clients:
        raise FloraError(
            f"{len(train.examples)} training examples for {num_clients} clients; raise data.limit"
        )
    parts = partition(
        labels,
        scheme=scheme,
        num_clients=num_clients,
        seed=seed,
        alpha=dirichlet_alpha,
        min_partition_size=min_partition_size,
        shards_per_client=shards_per_client,
        classes_per_client=classes_per_client,
        natural_ids=[train_records[i]["natural_id"] for i in train.kept]
        if natural_id_column
        else (),
    )
    if shift_client >= 0 and num_clients > 1:  # one client holds one category (robustness)
        parts = shift_to_category(parts, labels, shift_client, shift_category, seed)
    return FederatedData(
        clients=[[train.examples[i] for i in part] for part in parts],
        heldout=held.examples,
        heldout_records=[records[i] for i in held_idx],
        table=client_table(parts, labels) + "\n\n" + kept_table(train.counts, held.counts),
        counts={"train": train.counts, "heldout": held.counts},
    )


def kept_table(train: dict[str, KeptCounts], heldout: dict[str, KeptCounts]) -> str:
    """Per category: rows, and the share kept (whole or with a shortened prompt), train and
    held-out."""
    lines = [f"{'category':<24} {'rows':>6} {'kept':>7} {'cut':>6} {'dropped':>8}   held-out kept"]
    for name in sorted(set(train) | set(heldout)):
        t, h = train.get(name, KeptCounts(0, 0, 0)), heldout.get(name, KeptCounts(0, 0, 0))
        kept = f"{100 * (t.whole + t.shortened) / t.rows:.0f}%" if t.rows else "-"
        held = f"{h.whole + h.shortened}/{h.rows}" if h.rows else "-"
        lines.append(f"{name:<24} {t.rows:>6} {kept:>7} {t.shortened:>6} {t.dropped:>8}   {held}")
    return "\n".join(lines)


def run_data(config: RunConfig, tokenizer: PreTrainedTokenizerBase) -> FederatedData:
    """The run's data from its config: seeded end to end, so every runtime gets the same split."""
    fed = config.federation
    data = prepare_data(
        source=config.data.source,
        tokenizer=tokenizer,
        template=config.data.template,
        max_length=config.data.max_length,
        limit=config.data.limit,
        heldout=config.data.heldout,
        scheme=config.data.partition,
        num_clients=1 if fed.centralized else fed.num_clients,
        seed=config.seed,
        label_column=config.data.label_column,
        dirichlet_alpha=config.data.dirichlet_alpha,
        shards_per_client=config.data.shards_per_client,
        min_response=config.data.min_response_tokens,
        truncation=config.data.truncation,
        subset=config.data.subset,
        split=config.data.split,
        fields=config.data.fields,
        natural_id_column=config.data.natural_id_column,
        min_partition_size=config.data.min_partition_size,
        classes_per_client=config.data.classes_per_client,
        shift_client=config.data.shift_client,
        shift_category=config.data.shift_category,
    )
    check_accumulation(config.train.grad_accum, config.train.batch_size, data.clients)
    return data


def check_accumulation(grad_accum: int, batch_size: int, clients: Sequence[Sequence[Any]]) -> None:
    """A step may take at most one epoch of the largest client's micro-batches: a larger
    ``grad_accum`` is a mistake that would hold ever more batches in memory."""
    most = max((math.ceil(len(c) / batch_size) for c in clients), default=1)
    if grad_accum > max(1, most):
        raise FloraError(
            f"train.grad_accum must be at most {max(1, most)} (the largest client's micro-batches "
            f"of train.batch_size = {batch_size} in an epoch), got {grad_accum}; lower it"
        )
