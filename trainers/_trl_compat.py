"""The TRL helpers the MRL trainer reuses, imported in one place (docs/spec.md#trl-and-the-mrl-trainer).

Pinned to `trl==1.16.*` (setup.py): `disable_dropout_in_model` is public; the rest are semi-private and
may move in a later TRL. `tests/test_mrl.py` imports every name here, so a TRL change breaks in this one module.
"""

from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import (
    RepeatSampler,
    disable_dropout_in_model,
    entropy_from_logits,
    selective_log_softmax,
    shuffle_sequence_dict,
    split_tensor_dict,
)

__all__ = [
    "RepeatSampler",
    "disable_dropout_in_model",
    "entropy_from_logits",
    "selective_log_softmax",
    "shuffle_sequence_dict",
    "split_tensor_dict",
    "unwrap_model_for_generation",
]
