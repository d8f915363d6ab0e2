"""The classifier head: mask-token embeddings against text embeddings (METHOD.md §1.5).

s_{q,c} = T · ⟨f̂_q, t̂_c⟩ over the N vocabulary classes plus the literal "background" (last column), T = 100;
p_clip = softmax(s); p_cls(q, c) = p_obj(q) · p_clip(c | q) for c < N, the background column dropped without
renormalising. With ``log_p_obj=None`` (the paper's "without object score" ablation) p_cls = p_clip without
background.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_LOGIT_SCALE", "ClassifierOutput", "classify"]

DEFAULT_LOGIT_SCALE = 100.0


@dataclass
class ClassifierOutput:
    """Per-query class scores. ``...`` is any leading batch shape of the mask embeddings (e.g. (B, Q) or (Q,)).

    Attributes:
        logits: (..., N+1) T·cosine similarities, background last.
        log_probs: (..., N+1) log p_clip (log_softmax of ``logits``).
        log_p_cls: (..., N) log p_obj + log p_clip without the background column.
        p_cls: (..., N) exp(log_p_cls).
    """

    logits: torch.Tensor
    log_probs: torch.Tensor
    log_p_cls: torch.Tensor
    p_cls: torch.Tensor


def classify(
    mask_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    log_p_obj: torch.Tensor | None = None,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
) -> ClassifierOutput:
    """Score mask embeddings against a text bank.

    Args:
        mask_embeddings: (..., D) L2-normalised mask-token embeddings, e.g. (B, Q, D).
        text_embeddings: (N+1, D) L2-normalised text embeddings, "background" last.
        log_p_obj: (...) log object scores matching the leading shape of ``mask_embeddings``, e.g. (B, Q);
            None leaves the object score out (p_cls = p_clip).
        logit_scale: the fixed temperature inverse T (100 in MasQCLIP).

    Returns:
        A :class:`ClassifierOutput`; computed in float32 whatever the input dtype.
    """
    if text_embeddings.ndim != 2 or text_embeddings.shape[0] < 2:
        raise ValueError(f"text_embeddings must be (N+1, D) with N >= 1, got {tuple(text_embeddings.shape)}")
    if mask_embeddings.shape[-1] != text_embeddings.shape[-1]:
        raise ValueError(
            f"embedding sizes differ: masks {mask_embeddings.shape[-1]}, text {text_embeddings.shape[-1]}"
        )
    emb = mask_embeddings.float()
    logits = logit_scale * emb @ text_embeddings.to(emb.device, torch.float32).T
    log_probs = F.log_softmax(logits, dim=-1)
    log_p_cls = log_probs[..., :-1]
    if log_p_obj is not None:
        if log_p_obj.shape != mask_embeddings.shape[:-1]:
            raise ValueError(
                f"log_p_obj shape {tuple(log_p_obj.shape)} does not match masks {tuple(mask_embeddings.shape[:-1])}"
            )
        log_p_cls = log_p_cls + log_p_obj.float()[..., None]
    return ClassifierOutput(logits=logits, log_probs=log_probs, log_p_cls=log_p_cls, p_cls=log_p_cls.exp())
