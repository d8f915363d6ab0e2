"""The whole MasQCLIP model: class-agnostic proposals + MasQ visual encoder + text classifier.

Per image (METHOD.md §1.2, golden README §2):

1. proposal network input: (image − pixel_mean) / pixel_std (0–255 scale), zero-padded bottom/right to a multiple of
   32 in normalised space → mask logits (Q, Hp/4, Wp/4) and object scores p_obj (Q,);
2. CLIP input: the raw image zero-padded (black) to the same (Hp, Wp), /255, squashed to R×R bicubic, CLIP mean/std;
   attention masks from the mask logits;
3. mask-token embeddings (Q, D) → logits against the text bank (N+1, D) → log p_clip (Q, N+1) → p_cls (Q, N).

A batch may hold images of different sizes: each image is padded to its own multiple of 32 (never to the largest
in the batch) and CLIP squashes its own padded image, so an image's outputs never depend on the rest of the batch.
Images with the same padded size run together (bucketing).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from masqclip_cli.modeling.checkpoint import DEFAULT_THRESHOLDS
from masqclip_cli.modeling.classifier import DEFAULT_LOGIT_SCALE, classify
from masqclip_cli.modeling.clip_loader import ClipSpec
from masqclip_cli.modeling.masq_visual import MasQVisual
from masqclip_cli.modeling.proposals.network import ProposalNetwork
from masqclip_cli.modeling.text import TextEmbeddingCache, TextEncoder, build_text_embeddings
from masqclip_cli.vocab import Vocabulary

__all__ = ["MasQCLIP", "ImageOutput"]


@dataclass
class ImageOutput:
    """The model's outputs for one image (float32, on the model's device).

    Attributes:
        mask_logits: (Q, Hp/4, Wp/4) proposal mask logits at stride 4 of the padded image.
        log_p_obj: (Q,) log object scores.
        embeddings: (Q, D) L2-normalised mask-token embeddings.
        clip_log_probs: (Q, N+1) log p_clip, "background" last.
        p_cls: (Q, N) p_obj · p_clip without background (p_clip alone when the object score is off).
        image_size: (H, W) of the input image.
        padded_size: (Hp, Wp) it was padded to.
        aux: [(pred_logits (Q, 2), pred_masks (Q, Hp/4, Wp/4))] of the raw queries and every decoder layer but the
            last, when asked for.
    """

    mask_logits: torch.Tensor
    log_p_obj: torch.Tensor
    embeddings: torch.Tensor
    clip_log_probs: torch.Tensor
    p_cls: torch.Tensor
    image_size: tuple[int, int]
    padded_size: tuple[int, int]
    aux: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def p_obj(self) -> torch.Tensor:
        """(Q,) object scores."""
        return self.log_p_obj.exp()


class MasQCLIP(nn.Module):
    """Proposals + MasQ visual + classifier.

    Args:
        proposals: the class-agnostic proposal network (pixel mean/std and size divisibility inside).
        masq: the MasQ visual encoder.
        text_encoder: the CLIP text tower, to encode vocabularies; None for a fixed text bank.
        logit_scale: T of s = T·cos (100).
        use_object_score: p_cls = p_obj · p_clip (True, MasQCLIP) or p_clip alone (the paper's ablation).
        proposals_config: the proposal network's config (stored with the model when saved).
        clip_spec: how the CLIP model was made (stored with the model when saved).
        thresholds: post-processing defaults (object/overlap thresholds, detections per image).
    """

    def __init__(
        self,
        proposals: ProposalNetwork,
        masq: MasQVisual,
        text_encoder: TextEncoder | None = None,
        logit_scale: float = DEFAULT_LOGIT_SCALE,
        use_object_score: bool = True,
        proposals_config: dict[str, Any] | None = None,
        clip_spec: ClipSpec | None = None,
        thresholds: dict[str, float] | None = None,
    ):
        super().__init__()
        self.proposals_config = proposals_config
        self.clip_spec = clip_spec
        self.thresholds = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
        self.proposals = proposals
        self.masq = masq
        self.text_encoder = text_encoder
        self.logit_scale = logit_scale
        self.use_object_score = use_object_score
        self.vocabulary: Vocabulary | None = None
        #: ``{"short_side": S, "max_size": M}``: the input size the model was made for (stored in its file), or None.
        self.test_size: dict[str, int] | None = None
        self.register_buffer("text_embeddings", torch.zeros(0), persistent=False)

    # ------------------------------------------------------------------------------------------------ vocabulary
    def set_vocabulary(
        self,
        vocabulary: Vocabulary,
        templates: Sequence[str] | None = None,
        cache: TextEmbeddingCache | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Encode a vocabulary with the text tower (cached) and use it; returns the (N+1, D) text bank."""
        if self.text_encoder is None:
            raise ValueError("this model has no text tower: it can only use the vocabulary stored with it")
        bank = build_text_embeddings(vocabulary, self.text_encoder, templates=templates, cache=cache,
                                     progress=progress)
        self.set_text_embeddings(bank, vocabulary)
        return bank

    def set_text_embeddings(self, text_embeddings: torch.Tensor, vocabulary: Vocabulary | None = None) -> None:
        """Use a given (N+1, D) L2-normalised text bank ("background" last)."""
        if text_embeddings.ndim != 2 or text_embeddings.shape[1] != self.masq.output_dim:
            raise ValueError(
                f"text embeddings must be (N+1, {self.masq.output_dim}), got {tuple(text_embeddings.shape)}"
            )
        if vocabulary is not None and len(vocabulary) + 1 != text_embeddings.shape[0]:
            raise ValueError(f"{len(vocabulary)} classes need {len(vocabulary) + 1} text embeddings")
        self.text_embeddings = text_embeddings.to(self.masq.visual.conv1.weight.device, torch.float32)
        self.vocabulary = vocabulary

    # ------------------------------------------------------------------------------------------------ forward
    @property
    def size_divisibility(self) -> int:
        return self.proposals.size_divisibility

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        d = self.size_divisibility
        return (-(-height // d) * d, -(-width // d) * d)

    @torch.no_grad()
    def forward(self, images: Sequence[torch.Tensor], return_aux: bool = False) -> list[ImageOutput]:
        """Run the model on a list of images.

        Args:
            images: B tensors (3, H_i, W_i), RGB, uint8 or float in 0..255, any sizes.
            return_aux: also return the auxiliary predictions.

        Returns:
            B :class:`ImageOutput`, in input order.
        """
        if self.text_embeddings.numel() == 0:
            raise ValueError("no vocabulary: call set_vocabulary() or set_text_embeddings() first")
        buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, image in enumerate(images):
            if image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"image {index}: expected (3, H, W), got {tuple(image.shape)}")
            buckets[self.padded_size(image.shape[1], image.shape[2])].append(index)
        results: list[ImageOutput | None] = [None] * len(images)
        for padded, indices in buckets.items():
            for index, out in zip(indices, self.forward_padded([images[i] for i in indices], padded, return_aux)):
                results[index] = out
        return results  # type: ignore[return-value]

    def forward_padded(
        self, images: Sequence[torch.Tensor], padded: tuple[int, int], return_aux: bool = False
    ) -> list[ImageOutput]:
        """The model on B images padded together to ``padded`` = (Hp, Wp) (a multiple of the size divisibility,
        at least every image's size), with autograd as the caller has it: the training step of MasQ-tuning runs
        this; :meth:`forward` runs it under ``no_grad`` once per group of images with the same padded size.

        Args:
            images: B tensors (3, H_i, W_i), RGB, uint8 or float in 0..255.
            padded: (Hp, Wp), e.g. :meth:`padded_size` of the largest height and width.
            return_aux: also return the auxiliary predictions.

        Returns:
            B :class:`ImageOutput`, in input order.
        """
        device = self.masq.visual.conv1.weight.device
        dtype = self.masq.visual.conv1.weight.dtype
        images = [im.to(device) for im in images]
        normalized = self.proposals.normalize_and_pad(images).to(dtype)
        assert tuple(normalized.shape[-2:]) == padded
        proposal_out = self.proposals(normalized)
        raw = torch.zeros(len(images), 3, *padded, device=device, dtype=torch.float32)
        for i, im in enumerate(images):
            raw[i, :, : im.shape[1], : im.shape[2]] = im.float()
        pixels = self.masq.preprocess(raw)
        mask_logits = proposal_out.pred_masks.float()
        allowed = self.masq.attention_masks(mask_logits)
        embeddings = self.masq(pixels, allowed).float()
        log_p_obj = proposal_out.log_p_obj.float()
        scores = classify(embeddings, self.text_embeddings, log_p_obj if self.use_object_score else None,
                          self.logit_scale)
        outputs = []
        for i, im in enumerate(images):
            aux = []
            if return_aux:
                aux = [(a["pred_logits"][i].float(), a["pred_masks"][i].float()) for a in proposal_out.aux]
            outputs.append(
                ImageOutput(
                    mask_logits=mask_logits[i],
                    log_p_obj=log_p_obj[i],
                    embeddings=embeddings[i],
                    clip_log_probs=scores.log_probs[i],
                    p_cls=scores.p_cls[i],
                    image_size=(int(im.shape[1]), int(im.shape[2])),
                    padded_size=padded,
                    aux=aux,
                )
            )
        return outputs
