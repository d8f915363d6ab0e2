"""The Python API: :class:`Predictor` -- a model, its vocabulary and post-processing options in one object, with
``predict(image)`` / ``predict_batch(images)`` returning :class:`~masqclip_cli.structures.Segmentation` results that
know their classes.

    >>> from masqclip_cli import Predictor
    >>> predictor = Predictor("demo", vocab="samples/vocab.txt", tasks=("panoptic", "instance"))
    >>> seg = predictor.predict("samples/images/scene-000000.png")
    >>> confident = seg.filter(min_score=0.5)

``segment`` (the batched engine) and ``eval`` run images through the same object, so the Python API, the command
line and the metrics see one preprocessing path and one set of defaults: the test size and thresholds stored in the
model file, overridable here.

Devices: the input batch goes to the model's device through pinned (page-locked) host memory with
``non_blocking=True`` copies when that device is CUDA (:func:`stage_inputs`; nothing changes on CPU); the model's
outputs stay on its device and post-processing runs there: the only copies to the host are the final ``(H, W)``
label maps, the instances' bool masks and small per-query tables (scores, areas, indices).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import fields, replace
from typing import Any

import torch

from masqclip_cli.inference.postprocess import PostprocessConfig, postprocess
from masqclip_cli.inference.preprocess import ImageInput, load_rgb, prepare_image, test_size_of
from masqclip_cli.modeling.factory import load_model, resolve_device
from masqclip_cli.modeling.masqclip import ImageOutput, MasQCLIP
from masqclip_cli.modeling.runtime import compile_model
from masqclip_cli.structures import Segmentation
from masqclip_cli.vocab import VocabClass, Vocabulary, load_vocabulary

__all__ = ["Predictor", "postprocess_config", "as_vocabulary", "model_device", "stage_inputs"]

#: Thresholds a model file stores (``MasQCLIP.thresholds``) and the :class:`PostprocessConfig` field each sets.
_THRESHOLD_FIELDS = ("object_mask_threshold", "overlap_threshold", "detections_per_image")
_CONFIG_FIELDS = {f.name for f in fields(PostprocessConfig)}


def postprocess_config(model: MasQCLIP, tasks: Sequence[str] | str = ("panoptic",), **overrides: Any
                       ) -> PostprocessConfig:
    """The post-processing config a model runs with: its stored thresholds (``model.thresholds``: object mask
    threshold, overlap threshold, detections per image), then ``overrides`` (any :class:`PostprocessConfig` field;
    a value of None keeps the model's)."""
    unknown = sorted(set(overrides) - _CONFIG_FIELDS)
    if unknown:
        raise TypeError(f"unknown post-processing option(s) {', '.join(unknown)}; "
                        f"known: {', '.join(sorted(_CONFIG_FIELDS - {'tasks'}))}")
    stored = getattr(model, "thresholds", None) or {}
    values: dict[str, Any] = {k: stored[k] for k in _THRESHOLD_FIELDS if k in stored}
    if "detections_per_image" in values:
        values["detections_per_image"] = int(values["detections_per_image"])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return PostprocessConfig(tasks=tuple([tasks] if isinstance(tasks, str) else tasks), **values)


def model_device(model: MasQCLIP) -> torch.device:
    """The device a model runs on (that of its CLIP tower's weights, where ``MasQCLIP.forward`` puts the inputs)."""
    return model.masq.visual.conv1.weight.device


def stage_inputs(tensors: Sequence[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """The input batch on its way to ``device``.

    For a CUDA device each host tensor is copied once into pinned (page-locked) memory and sent with
    ``non_blocking=True``, so the transfer is asynchronous and overlaps the host's next steps (the model's kernels
    run after it on the same stream); on any other device the tensors are returned as they are (the model moves
    them itself), so nothing changes on CPU.

    Args:
        tensors: B ``(3, H_i, W_i)`` uint8 model inputs (:func:`~masqclip_cli.inference.preprocess.prepare_image`),
            any layout.
        device: the model's device.

    Returns:
        B tensors, on ``device`` for CUDA (same values), else the given tensors themselves.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return list(tensors)
    staged = []
    for t in tensors:
        if t.device.type == "cpu":
            pinned = torch.empty(tuple(t.shape), dtype=t.dtype, pin_memory=True)
            pinned.copy_(t)  # one copy, contiguous (prepare_image hands a permuted view)
            t = pinned
        staged.append(t.to(device, non_blocking=True))
    return staged


def as_vocabulary(vocab: Vocabulary | str | os.PathLike | Sequence[str]) -> Vocabulary:
    """A :class:`Vocabulary` from a vocabulary, a spec string (file, preset name or inline ``'a; b; c [stuff]'``
    list), a path, or a list of class names (all things)."""
    if isinstance(vocab, Vocabulary):
        return vocab
    if isinstance(vocab, (str, os.PathLike)):
        return load_vocabulary(vocab)
    names = [str(n) for n in vocab]
    return Vocabulary([VocabClass(name=n) for n in names], source="<names>")


class Predictor:
    """A model ready to segment images with a vocabulary.

    Args:
        model: a loaded :class:`MasQCLIP`, or what :func:`masqclip_cli.load_model` loads (a registered name such as
            ``"demo"``, one of our ``.safetensors`` files, an official ``.pth`` checkpoint).
        vocab: the classes (a :class:`Vocabulary`, a file / preset / inline spec, or a list of names); None uses the
            vocabulary stored in the model.
        tasks: any of ``"panoptic"``, ``"semantic"``, ``"instance"`` (one model pass serves them all).
        device: where a model loaded here runs (``"auto"``: CUDA, else MPS, else CPU); a given model is moved there
            when set.
        precision: ``fp32``, ``bf16`` or ``fp16`` for a model loaded here.
        compile: ``torch.compile`` the model's forwards (:func:`~masqclip_cli.modeling.runtime.compile_model`, in
            place, on first use; a failure warns once (``RuntimeWarning``) and runs eager).
        templates: prompt templates for encoding ``vocab`` (None: the model's default).
        text_cache: a :class:`~masqclip_cli.modeling.text.TextEmbeddingCache` for the vocabulary's text embeddings.
        short_side, max_size: the test resize; None = the model's stored test size (else 640 / 2560).
        config: a complete :class:`PostprocessConfig` (then ``tasks`` and ``postprocess_options`` must be unset).
        **postprocess_options: :class:`PostprocessConfig` fields (``object_mask_threshold``, ``overlap_threshold``,
            ``detections_per_image``, ``semantic_order``, ``instance_keep_stuff``, ...), overriding the model's
            stored thresholds.
    """

    def __init__(
        self,
        model: MasQCLIP | str | os.PathLike,
        vocab: Vocabulary | str | os.PathLike | Sequence[str] | None = None,
        *,
        tasks: Sequence[str] | str = ("panoptic",),
        device: str | torch.device | None = None,
        precision: str = "fp32",
        templates: Sequence[str] | None = None,
        text_cache: Any = None,
        short_side: int | None = None,
        max_size: int | None = None,
        config: PostprocessConfig | None = None,
        compile: bool = False,  # noqa: A002 - the flag's name (segment --compile)
        **postprocess_options: Any,
    ) -> None:
        if not isinstance(model, MasQCLIP):
            model = load_model(str(model), device=resolve_device(str(device or "auto")), precision=precision)
        elif device is not None:
            model = model.to(device)
        if compile:
            compile_model(model)
        self.model: MasQCLIP = model
        if vocab is not None:
            vocabulary = as_vocabulary(vocab)
            if vocabulary != model.vocabulary or templates is not None:
                model.set_vocabulary(vocabulary, templates=list(templates) if templates else None, cache=text_cache,
                                     progress=False)
        if model.vocabulary is None:
            raise ValueError("the model stores no vocabulary: give one (vocab=...)")
        self._vocabulary: Vocabulary = model.vocabulary
        if config is not None:
            if postprocess_options:
                raise TypeError("give either config or post-processing options, not both")
            self.config = config
        else:
            self.config = postprocess_config(model, tasks, **postprocess_options)
        size = test_size_of(model)
        self.short_side = size["short_side"] if short_side is None else int(short_side)
        self.max_size = size["max_size"] if max_size is None else int(max_size)

    @classmethod
    def for_encoded(cls, model: MasQCLIP, vocab: Vocabulary, config: PostprocessConfig, short_side: int,
                    max_size: int) -> Predictor:
        """A predictor over a model whose text bank already encodes ``vocab`` (``model.set_vocabulary(vocab)`` or
        ``set_text_embeddings(bank, vocab)`` was called): nothing is encoded or loaded here."""
        if int(model.text_embeddings.shape[0]) != len(vocab) + 1:
            raise ValueError(f"the model's text bank has {int(model.text_embeddings.shape[0])} rows; "
                             f"a vocabulary of {len(vocab)} classes needs {len(vocab) + 1}")
        self = object.__new__(cls)
        self.model, self._vocabulary, self.config = model, vocab, config
        self.short_side, self.max_size = int(short_side), int(max_size)
        return self

    # --- properties --------------------------------------------------------------------------------------------
    @property
    def vocabulary(self) -> Vocabulary:
        """The vocabulary results are named from."""
        return self._vocabulary

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.config.tasks)

    def with_options(self, **postprocess_options: Any) -> Predictor:
        """A predictor sharing this model, with other post-processing options (``tasks`` included)."""
        other = object.__new__(Predictor)
        other.__dict__.update(self.__dict__)
        other.config = replace(self.config, **postprocess_options)
        return other

    # --- the steps (the engine times them apart) ---------------------------------------------------------------
    def preprocess(self, image: ImageInput) -> tuple:
        """``(rgb, tensor)``: the image as ``(H, W, 3)`` uint8 RGB and the ``(3, H', W')`` uint8 model input."""
        rgb = load_rgb(image)
        return rgb, prepare_image(rgb, self.short_side, self.max_size)

    @torch.no_grad()
    def forward(self, tensors: Sequence[torch.Tensor]) -> list[ImageOutput]:
        """The model on B prepared ``(3, H', W')`` inputs (one call; results equal batch 1), staged to the model's
        device by :func:`stage_inputs` (pinned memory, non-blocking copies on CUDA). Outputs stay on that device."""
        return self.model(stage_inputs(tensors, model_device(self.model)))

    def postprocess(self, output: ImageOutput, output_size: tuple[int, int]) -> Segmentation:
        """One model output -> the requested tasks at ``output_size`` (H, W), named with the vocabulary; computed on
        the output's device, only the final maps and masks are copied to the host."""
        seg = postprocess(output.mask_logits, output.p_cls, self.vocabulary.isthing, image_size=output.image_size,
                          padded_size=output.padded_size, output_size=output_size, config=self.config)
        return seg.with_vocabulary(self.vocabulary)

    # --- the API -----------------------------------------------------------------------------------------------
    def predict(self, image: ImageInput) -> Segmentation:
        """Segment one image (a path, a PIL image, or an ``(H, W, 3)`` uint8 RGB array) at its own size."""
        return self.predict_batch([image])[0]

    def predict_batch(self, images: Iterable[ImageInput], batch_size: int | None = None) -> list[Segmentation]:
        """Segment several images, ``batch_size`` per model call (all at once by default); the results equal
        :meth:`predict` of each."""
        prepared = [self.preprocess(image) for image in images]
        step = len(prepared) if not batch_size else int(batch_size)
        results: list[Segmentation] = []
        for start in range(0, len(prepared), max(step, 1)):
            chunk = prepared[start : start + step]
            outputs = self.forward([tensor for _, tensor in chunk])
            results += [self.postprocess(out, rgb.shape[:2]) for (rgb, _), out in zip(chunk, outputs)]
        return results

    def __repr__(self) -> str:
        return (f"Predictor({len(self.vocabulary)} classes, tasks={list(self.tasks)}, "
                f"test size {self.short_side}/{self.max_size})")
