"""flora: federated fine-tuning of LLMs with heterogeneous-rank LoRA (FLoRA stacking and peers)."""

from flora.errors import FloraError

__all__ = ["FloraError", "__version__"]
__version__ = "0.1.0"
