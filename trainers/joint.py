"""Stages 1 and 2: joint LM pre-training and interaction SFT (docs/spec.md#joint-lm-pre-training,
docs/spec.md#interaction-sft).

The encoder learns masked-LM on masked ids; the decoder learns autoregressive LM on the unmasked ids while its
memory cross-attention reads the **detached** encoder layer outputs `ED [L, B, T, D]` as a stand-in STM (the `T`
positions act as slots), with optional slot dropout and Gaussian noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .common import RxTTrainer, RxTTrainingArguments, token_accuracy


@dataclass
class JointLMConfig(RxTTrainingArguments):
    """Stage 1 (`sft=False`, rows `{text}`) or stage 2 (`sft=True`, rows `{query, answer}`)."""

    sft: bool = field(default=False, metadata={"help": "Interaction SFT (answer-only decoder targets)."})
    encoder_loss_scale: float = field(default=1.0, metadata={"help": "Weight of the encoder MLM loss."})
    decoder_loss_scale: float = field(default=1.0, metadata={"help": "Weight of the decoder AR loss."})
    fake_stm_noise_level: float | None = field(
        default=None, metadata={"help": "Std of Gaussian noise added to the detached ED read as memory."}
    )
    fake_stm_masking_prob: float | None = field(
        default=None, metadata={"help": "Probability of dropping an ED slot (per layer, no rescaling)."}
    )
    mask_prob: float = field(default=0.15, metadata={"help": "MLM selection probability (collator)."})
    max_length: int = field(default=256, metadata={"help": "Maximum tokens of a row."})

    def __post_init__(self):
        super().__post_init__()
        for name in ("fake_stm_noise_level", "fake_stm_masking_prob"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < (1.0 if name.endswith("prob") else float("inf")):
                raise ValueError(f"{name}={value}: expected a value in [0, 1) for probabilities, >= 0 for noise.")
        if self.encoder_loss_scale < 0 or self.decoder_loss_scale < 0:
            raise ValueError("encoder_loss_scale and decoder_loss_scale must be >= 0.")


class JointLMTrainer(RxTTrainer):
    """Encoder MLM + decoder AR on the same batch; the model must have an MLM head (`use_mlm_head=True`).

    Batches come from `trainers.data.JointLMCollator`: `input_ids`, `attention_mask`, `labels` (decoder),
    `mlm_input_ids`, `mlm_labels` (encoder).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.rxt_model().mlm_head is None:
            raise ValueError("JointLMTrainer needs a model with an MLM head: build it with RxTConfig(use_mlm_head=True).")

    def fake_stm(self, encoded: torch.Tensor) -> torch.Tensor:
        """Detached ED `[L, B, T, D]` with slot dropout (keep ~ Bernoulli(1−p) per layer and slot) and noise."""
        stm = encoded.detach()
        if self.args.fake_stm_masking_prob:
            keep = torch.rand(stm.shape[:3], device=stm.device) >= self.args.fake_stm_masking_prob
            stm = stm * keep.unsqueeze(-1).to(stm.dtype)
        if self.args.fake_stm_noise_level:
            stm = stm + torch.randn_like(stm) * self.args.fake_stm_noise_level
        return stm

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mask = inputs["attention_mask"]
        encoder_out = model(
            input_ids=inputs["mlm_input_ids"], attention_mask=mask, labels=inputs["mlm_labels"], mode="mlm"
        )
        decoder_out = model(
            input_ids=inputs["input_ids"],
            attention_mask=mask,
            labels=inputs["labels"],
            stm=self.fake_stm(encoder_out.encoder_hidden_states),
        )
        mlm_loss = encoder_out.loss if encoder_out.loss is not None else decoder_out.loss * 0
        loss = self.args.encoder_loss_scale * mlm_loss + self.args.decoder_loss_scale * decoder_out.loss
        loss = loss + self.moe_aux(decoder_out)
        self.record(
            mlm_loss=mlm_loss,
            ar_loss=decoder_out.loss,
            mlm_accuracy=token_accuracy(encoder_out.mlm_logits, inputs["mlm_labels"], shift=False),
            ar_accuracy=token_accuracy(decoder_out.logits, inputs["labels"]),
            moe_aux_loss=decoder_out.aux_loss,
        )
        return (loss, decoder_out) if return_outputs else loss
