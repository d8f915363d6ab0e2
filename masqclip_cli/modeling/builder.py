"""Building and saving models: a :class:`MasQCLIP` from a proposal-network config and a CLIP, and back to our file.

This is the layer under both :mod:`masqclip_cli.modeling.convert` (official checkpoints) and
:mod:`masqclip_cli.modeling.factory` (registered names and model files); it imports neither.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from masqclip_cli.modeling.checkpoint import save_model_file
from masqclip_cli.modeling.clip_loader import create_open_clip, get_tokenizer
from masqclip_cli.modeling.masq_visual import MasQVisual
from masqclip_cli.modeling.masqclip import MasQCLIP
from masqclip_cli.modeling.proposals.network import PROPOSAL_CONFIGS, build_proposal_network
from masqclip_cli.modeling.text import TextEncoder

__all__ = ["build_model", "resolve_proposal_config", "save_model"]


def resolve_proposal_config(proposals: str | dict[str, Any]) -> dict[str, Any]:
    """A proposal-network config from a ``PROPOSAL_CONFIGS`` name or a config dict (deep copy)."""
    if isinstance(proposals, dict):
        return copy.deepcopy(proposals)
    if proposals not in PROPOSAL_CONFIGS:
        raise ValueError(f"unknown proposal network '{proposals}' (known: {', '.join(PROPOSAL_CONFIGS)})")
    return copy.deepcopy(PROPOSAL_CONFIGS[proposals])


def build_model(
    proposals: str | dict[str, Any],
    clip_model: str | dict[str, Any],
    clip_pretrained: str | Path | None = None,
    fq_init: str = "copy",
    seed: int | None = 0,
    thresholds: dict[str, float] | None = None,
) -> MasQCLIP:
    """A model with a randomly initialised proposal network and the given CLIP (random, a tag or a file).

    Args:
        proposals: a ``PROPOSAL_CONFIGS`` name (``m2f-r50``, ``tiny``) or a config dict.
        clip_model: an open_clip model name or config dict.
        clip_pretrained: open_clip pretrained tag, weights file, or None for random CLIP weights.
        fq_init: ``copy`` (f_Q' = CLIP's f_Q) or ``random``.
        seed: seeds the random initialisation (None: leave the global RNG alone).
        thresholds: post-processing defaults stored with the model.
    """
    if seed is not None:
        torch.manual_seed(seed)
    proposal_config = resolve_proposal_config(proposals)
    network = build_proposal_network(proposal_config).eval()
    clip, spec = create_open_clip(clip_model, clip_pretrained)
    masq = MasQVisual(clip.visual, fq_init=fq_init).eval()
    text_encoder = TextEncoder(clip, get_tokenizer(spec), spec.weights_id)
    model = MasQCLIP(network, masq, text_encoder, proposals_config=proposal_config, clip_spec=spec,
                     thresholds=thresholds)
    return model.eval()


def save_model(model: MasQCLIP, path: str | Path, extra: dict[str, Any] | None = None,
               storage_dtype: torch.dtype | None = None) -> Path:
    """Write a model (with its text tower and, when set, its vocabulary) as our model file (``storage_dtype``:
    e.g. ``torch.float16`` to store the weights in half precision, read back as float32)."""
    vocabulary = model.vocabulary
    return save_model_file(
        path,
        model.masq,
        model.clip_spec,
        clip_model=model.text_encoder.model if model.text_encoder is not None else None,
        proposals=model.proposals,
        proposals_config=model.proposals_config,
        vocabulary=vocabulary,
        text_embeddings=model.text_embeddings.cpu() if vocabulary is not None else None,
        thresholds=model.thresholds,
        extra=extra,
        test_size=model.test_size,
        storage_dtype=storage_dtype,
    )
