"""Rebuild flora's shipped tiny tokenizer (src/flora/tiny_tokenizer.json) from SmolLM2's.

    python scripts/rebuild_tiny_tokenizer.py

Reads the packaged SmolLM2 checkpoint's tokenizer.json (converted into the cache on first use,
flora.models.smollm2_checkpoint) and writes its first 4,096 tokens (flora.tiny_tokenizer.derive).
tests/test_tiny_tokenizer.py checks that the shipped file equals what this writes.
"""

from __future__ import annotations

import json

from flora.models import smollm2_checkpoint
from flora.tiny_tokenizer import TOKENIZER_FILE, derive


def main() -> None:
    smollm2 = json.loads((smollm2_checkpoint() / "tokenizer.json").read_text(encoding="utf-8"))
    text = json.dumps(derive(smollm2), ensure_ascii=False, separators=(",", ":"))
    TOKENIZER_FILE.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {TOKENIZER_FILE} ({len(text.encode()) // 1024} KiB)")


if __name__ == "__main__":
    main()
