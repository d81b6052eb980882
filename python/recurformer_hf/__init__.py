"""RecurFormer checkpoints in PyTorch / transformers (issue 23): the configuration and modeling files
that `convert` and `train` copy into every RecurFormer checkpoint (`trust_remote_code`), and the
accelerate training script (`train_accelerate.py`)."""

from .configuration_recurformer import RecurformerConfig
from .modeling_recurformer import RecurformerCache, RecurformerForCausalLM, RecurformerModel

__all__ = ["RecurformerConfig", "RecurformerCache", "RecurformerForCausalLM", "RecurformerModel"]
