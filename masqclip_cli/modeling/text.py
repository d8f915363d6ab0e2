"""Text side of the classifier: vocabulary → (N+1, D) L2-normalised text embeddings, "background" last.

Each class is encoded from its prompts (display name and synonyms, see :mod:`masqclip_cli.vocab`), each put through
every prompt template (none = bare names, the official default). All raw (unnormalised) embeddings of a class are
averaged and the mean is L2-normalised, as the official code does for synonyms (METHOD.md §1.5). The literal class
"background" is encoded the same way and appended last.

Embeddings are cached on disk, keyed by model, weights identity, the class prompts and the templates: a second run
with the same vocabulary encodes nothing. The cache lives in ``$MASQCLIP_CACHE_DIR/text`` (default
``$XDG_CACHE_HOME/masqclip/text``, i.e. ``~/.cache/masqclip/text``).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from masqclip_cli.vocab import Vocabulary, short_name

__all__ = [
    "BACKGROUND",
    "TextEncoder",
    "TextEmbeddingCache",
    "build_text_embeddings",
    "default_cache_dir",
    "encode_text_trimmed",
]

BACKGROUND = "background"


def default_cache_dir() -> Path:
    """``$MASQCLIP_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/masqclip`` (``~/.cache/masqclip``)."""
    env = os.environ.get("MASQCLIP_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "masqclip"


def encode_text_trimmed(model: nn.Module, text: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(text)`` computed on the token columns up to the batch's last end token only.

    For open_clip's ``CLIP`` text tower (causal attention mask, the end token's features pooled, ``text_pool_type
    "argmax"``): a token never sees later ones and every sequence's pooled end token lies within the kept columns, so
    the result equals the full-context forward up to float rounding (~1e-7), at a fraction of the cost -- class names
    are 3-8 tokens of a 77-token context. Any other text tower (no causal mask, another pooling, a Hugging Face
    tower) runs ``encode_text`` unchanged.

    Args:
        model: an open_clip model with ``encode_text``.
        text: ``(n, context_length)`` int64 tokens.

    Returns:
        ``(n, D)`` raw (unnormalised) text embeddings, as ``encode_text``.
    """
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection", "attn_mask")
    if (
        text.ndim != 2
        or text.shape[0] == 0
        or getattr(model, "text_pool_type", None) != "argmax"
        or not all(hasattr(model, name) for name in needed)
        or model.attn_mask is None
    ):
        return model.encode_text(text)
    length = int(text.argmax(dim=-1).max()) + 1  # the end token has the highest id: its last position
    if length >= text.shape[1]:
        return model.encode_text(text)
    cast_dtype = model.transformer.get_cast_dtype() if hasattr(model.transformer, "get_cast_dtype") else None
    text = text[:, :length]
    x = model.token_embedding(text)
    pos = model.positional_embedding[:length]
    if cast_dtype is not None:
        x, pos = x.to(cast_dtype), pos.to(cast_dtype)
    x = model.transformer(x + pos, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]
    if model.text_projection is None:
        return x
    return model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection


class TextEncoder:
    """An open_clip text tower with its tokenizer.

    Args:
        clip_model: an open_clip ``CLIP`` (anything with ``encode_text(tokens) -> (n, D)``).
        tokenizer: open_clip tokenizer: list[str] -> (n, context_length) int64.
        model_id: names the model and its weights for cache keys (e.g. ``ViT-B-16/openai`` or a tensor digest).
    """

    def __init__(self, clip_model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor], model_id: str):
        self.model = clip_model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.calls = 0  # number of encode_text batches run (tests count cache hits with it)

    @property
    def context_length(self) -> int:
        return int(getattr(self.tokenizer, "context_length", 77))

    def token_count(self, text: str) -> int | None:
        """Number of BPE tokens of ``text`` without start/end tokens, when the tokenizer can tell."""
        encode = getattr(self.tokenizer, "encode", None)
        if encode is None:
            return None
        try:
            return len(encode(text))
        except Exception:  # noqa: BLE001 - some HF tokenizers differ; length check is only a warning
            return None

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """Raw (unnormalised) text embeddings.

        Args:
            texts: n strings.
            batch_size: strings per ``encode_text`` call.
            progress: show a tqdm bar on stderr.

        Returns:
            (n, D) float32 on CPU.
        """
        device = next(self.model.parameters()).device
        if not texts:
            return torch.zeros(0, 0)
        tokens = self.tokenizer(list(texts))  # (n, context_length)
        # Batches of similar length, each trimmed to its longest text (encode_text_trimmed): bare names cost a few
        # columns of the 77-token context instead of all of them. Rows are returned in the input order.
        order = torch.argsort(tokens.argmax(dim=-1), stable=True)
        batches = range(0, len(texts), batch_size)
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc="encoding class names", unit="batch", leave=False)
        parts = []
        for start in batches:
            rows = order[start : start + batch_size]
            parts.append(encode_text_trimmed(self.model, tokens[rows].to(device)).float().cpu())
            self.calls += 1
        by_length = torch.cat(parts)
        out = torch.empty_like(by_length)
        out[order] = by_length  # back to the input order
        return out


class TextEmbeddingCache:
    """(N+1, D) text embedding matrices on disk, one safetensors file per key, written atomically."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir() / "text"

    @staticmethod
    def key(model_id: str, prompts: Sequence[Sequence[str]], templates: Sequence[str] | None) -> str:
        """sha256 of the model identity, every class's prompts (background included) and the templates."""
        payload = json.dumps(
            {"model": model_id, "prompts": [list(p) for p in prompts], "templates": list(templates or [])},
            ensure_ascii=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))["embeddings"]
        except Exception as exc:  # noqa: BLE001 - a broken cache entry is recomputed, never fatal
            warnings.warn(f"{path}: unreadable text-embedding cache entry ({exc}); recomputing", stacklevel=2)
            return None

    def put(self, key: str, embeddings: torch.Tensor, meta: dict[str, Any]) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.path(key).with_suffix(f".tmp{os.getpid()}")
            save_file(
                {"embeddings": embeddings.contiguous()},
                str(tmp),
                metadata={k: json.dumps(v) for k, v in meta.items()},
            )
            os.replace(tmp, self.path(key))
        except OSError as exc:  # read-only home, full disk: caching is an optimisation only
            warnings.warn(f"{self.directory}: cannot write the text-embedding cache ({exc})", stacklevel=2)


def _check_lengths(vocab: Vocabulary, encoder: TextEncoder, templates: Sequence[str] | None) -> None:
    limit = encoder.context_length - 2
    for cls in vocab:
        for name in cls.prompts:
            texts = [t.format(name) for t in templates] if templates else [name]
            longest = max(texts, key=len)
            count = encoder.token_count(longest)
            if count is not None and count > limit:
                where = f"{vocab.source}:{cls.line}" if cls.line else vocab.source
                warnings.warn(
                    f"{where}: class name '{short_name(name)}' is {count} tokens, longer than the CLIP context "
                    f"({limit}); it was truncated",
                    stacklevel=3,
                )


def build_text_embeddings(
    vocab: Vocabulary,
    encoder: TextEncoder,
    templates: Sequence[str] | None = None,
    cache: TextEmbeddingCache | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """Text embeddings of a vocabulary plus "background".

    Args:
        vocab: the N classes.
        encoder: text tower + tokenizer.
        templates: prompt templates with one ``{}`` each, or None for bare names (official).
        cache: on-disk cache; None disables caching.
        batch_size: strings per ``encode_text`` call.
        progress: show a progress bar while encoding.

    Returns:
        (N+1, D) float32, rows L2-normalised, row N = "background".
    """
    prompts = [tuple(c.prompts) for c in vocab] + [(BACKGROUND,)]
    templates = list(templates) if templates else None
    key = TextEmbeddingCache.key(encoder.model_id, prompts, templates)
    if cache is not None:
        hit = cache.get(key)
        if hit is not None and hit.shape[0] == len(prompts):
            return hit
    _check_lengths(vocab, encoder, templates)
    texts: list[str] = []
    owner: list[int] = []
    for index, names in enumerate(prompts):
        for name in names:
            for text in [t.format(name) for t in templates] if templates else [name]:
                texts.append(text)
                owner.append(index)
    raw = encoder.encode(texts, batch_size=batch_size, progress=progress)
    owner_t = torch.tensor(owner)
    sums = torch.zeros(len(prompts), raw.shape[1]).index_add_(0, owner_t, raw)
    counts = torch.bincount(owner_t, minlength=len(prompts)).clamp(min=1).unsqueeze(1)
    embeddings = F.normalize(sums / counts, dim=-1)
    if cache is not None:
        cache.put(key, embeddings, {"model": encoder.model_id, "classes": len(vocab), "templates": templates})
    return embeddings
