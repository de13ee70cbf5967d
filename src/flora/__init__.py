"""flora: federated fine-tuning of LLMs with heterogeneous-rank LoRA (FLoRA stacking and peers)."""

import logging

from flora.errors import FloraError

# bitsandbytes (which peft imports when it is installed) warns at every import, on CPUs with
# AVX512-BF16, that a Hub kernel for its CPU inference path is missing; flora never takes that
# path (flora.quantization turns it off), so the warning only alarms
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__all__ = ["FloraError", "__version__"]
__version__ = "0.1.0"
