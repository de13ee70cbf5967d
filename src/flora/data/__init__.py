"""The data layer: load instruction records, encode them with masked prompts, split them
across clients, and batch them. Batching (torch) loads on first use, so the config stays
torch-free."""

from typing import TYPE_CHECKING, Any

from flora.data.partition import (
    SCHEMES,
    client_table,
    natural_clients,
    partition,
    split_heldout,
)
from flora.data.prompts import (
    IGNORE_INDEX,
    TEMPLATES,
    TRUNCATIONS,
    EncodedRecords,
    Example,
    KeptCounts,
    Template,
    encode_example,
    encode_prompt,
    encode_records,
    format_prompt,
)
from flora.data.sources import (
    DATA_DIR_ENV,
    DOLLY_FILE,
    DOLLY_HUB_ID,
    Record,
    find_shared_data,
    load_records,
)

if TYPE_CHECKING:
    from flora.data.batching import batches, collate

__all__ = [
    "DATA_DIR_ENV",
    "DOLLY_FILE",
    "DOLLY_HUB_ID",
    "IGNORE_INDEX",
    "SCHEMES",
    "TEMPLATES",
    "TRUNCATIONS",
    "EncodedRecords",
    "Example",
    "KeptCounts",
    "Record",
    "Template",
    "batches",
    "client_table",
    "collate",
    "encode_example",
    "encode_prompt",
    "encode_records",
    "find_shared_data",
    "format_prompt",
    "load_records",
    "natural_clients",
    "partition",
    "split_heldout",
]


def __getattr__(name: str) -> Any:
    if name in ("batches", "collate"):
        from flora.data import batching

        return getattr(batching, name)
    raise AttributeError(f"module 'flora.data' has no attribute {name!r}")
