"""Post-processing on the model's device, the staged input batch, ``--workers`` and ``--compile``.

- Results are unchanged: ``Predictor`` on the sample scenes (tiny-random and demo, all three tasks, cached and chunked
  memory paths) equals the model run by hand followed by the former post-processing (its three changed functions are
  kept here verbatim, as they were before post-processing moved its per-query host syncs off the device path).
- No float mask plane (or any float tensor larger than the ``(Q, N)`` score table) is ever copied to the host or
  turned into Python numbers: every such call on a tensor is watched; only the final maps, the instances' bool
  masks and small per-query tables come back.
- ``stage_inputs``: CPU tensors are untouched on CPU; for CUDA they go through one pinned buffer and a
  ``non_blocking`` copy (checked with the two calls faked, no GPU here).
- ``compile_model``: a compiler that fails to set up or fails on the first call gives one line and the eager
  results; a working one is used; out-of-memory is not hidden. (A real ``torch.compile`` of tiny-random takes more
  than a minute on this machine's CPU -- tracing alone 17 s, inductor's first kernel 24 s -- so it is not run here.)
- ``segment --workers 3`` writes byte-identical folders to ``--workers 1``; ``--compile`` with a failing compiler warns
  once and writes the eager outputs; the decoding producer keeps listing order whatever the decode times.
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor
from typer.testing import CliRunner

import masqclip_cli.inference.postprocess as pp
from masqclip_cli.cli import app
from masqclip_cli.inference import engine
from masqclip_cli.inference.postprocess import PostprocessConfig, postprocess
from masqclip_cli.inference.predictor import Predictor, stage_inputs
from masqclip_cli.io.sources import SourceItem
from masqclip_cli.modeling.factory import load_model
from masqclip_cli.modeling.runtime import compile_model, is_compiled
from masqclip_cli.structures import Segment, Segmentation
from masqclip_cli.structures.masks import mask_bbox, segment_stats
from masqclip_cli.vocab import load_vocabulary

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "samples" / "images"
SCENES = sorted(IMAGES.glob("*.png"))
SOME = SCENES[:3]  # enough for the equality checks (the CLI test takes the whole folder)
VOCAB_FILE = ROOT / "samples" / "vocab.txt"
TASKS = ("panoptic", "semantic", "instance")
TINY_VOCAB = "cat; dog; road [stuff]; sky [stuff]"
runner = CliRunner()


# ---------------------------------------------------------------------------------------------------- the former code
# Verbatim (but for names) from masqclip_cli/inference/postprocess.py before this change; helpers it calls are
# unchanged and imported from the module.
def old_semantic_chunks(mask_logits, p_cls, image_size, padded_size, output_size, order, chunk_size, max_bytes,  # noqa: ANN001, ANN201, E501
                        planes=None, prune=False) -> Iterator[tuple[Tensor, Tensor]]:
    q, n = p_cls.shape
    h, w = image_size
    ho, wo = output_size
    p = p_cls.detach().to(device=mask_logits.device, dtype=torch.float32)
    logits = mask_logits.detach()
    work = (ho, wo)
    work_px = ho * wo
    if planes is None:
        planes = pp._MaskPlanes(logits, padded_size, image_size, output_size, max_bytes, 0, 0)

    def sig(idx: Tensor) -> Tensor:
        if order == "padded":
            m = pp._sigmoid_(planes.padded(idx))[:, :h, :w]
            return m.contiguous() if (ho, wo) == (h, w) else pp._resize_planes(m, (ho, wo))
        return pp._sigmoid_(planes.output(idx))

    qstep = pp._chunk(chunk_size, work_px, max_bytes, q)
    qchunks = [torch.arange(s, min(s + qstep, q), device=logits.device) for s in range(0, q, qstep)]
    cache = None
    if q * work_px * 4 <= max_bytes:
        cache = torch.empty((q, work_px), dtype=torch.float32, device=logits.device)
        for idx in qchunks:
            cache[idx[0] : idx[-1] + 1] = sig(idx).reshape(len(idx), work_px)
    classes = torch.arange(n, device=logits.device)
    if prune and cache is not None and q > 0:
        classes = pp._semantic_candidates(p, cache, classes)
    cstep = pp._chunk(None, work_px, max_bytes, n)
    for c0 in range(0, int(classes.numel()), cstep):
        cls = classes[c0 : c0 + cstep]
        pc = p.index_select(1, cls)
        if cache is not None:
            scores = torch.mm(pc.T, cache)
        else:
            scores = torch.zeros((len(cls), work_px), dtype=torch.float32, device=logits.device)
            for idx in qchunks:
                scores.addmm_(pc[idx].T, sig(idx).reshape(len(idx), work_px))
        yield cls, scores.view(len(cls), *work)


def old_panoptic(source, out_size, p_cls, isthing, object_mask_threshold, overlap_threshold, logits, chunk,  # noqa: ANN001, ANN201, C901
                 device):
    h, w = out_size
    p = p_cls.detach().to(device=device, dtype=torch.float32)
    classes = p.argmax(dim=1)
    scores = p.gather(1, classes[:, None])[:, 0]
    keep = torch.nonzero(scores > float(object_mask_threshold)).flatten()
    k = int(keep.numel())
    if k == 0:
        return np.zeros((h, w), dtype=np.int32), []
    state = None
    orig_area = torch.zeros(k, dtype=torch.int64, device=device)
    for j0 in range(0, k, chunk):
        idx = keep[j0 : j0 + chunk]
        m = source(idx)
        if logits:
            m = pp._sigmoid_(m)
        ge = m >= 0.5
        orig_area[j0 : j0 + len(idx)] = ge.sum(dim=(1, 2))
        prob = m.mul_(scores[idx].view(-1, 1, 1))
        state = pp._running_argmax(state, prob, j0, ge)
    _, arg, win_ge = state
    mask_area = torch.bincount(arg.flatten(), minlength=k)
    inter_area = torch.bincount(arg[win_ge], minlength=k)
    keep_l, cls_l, score_l = keep.tolist(), classes.tolist(), scores.tolist()
    ids = [0] * k
    segments: list[Segment] = []
    stuff_ids: dict[int, int] = {}
    for j, (ma, oa, ia) in enumerate(zip(mask_area.tolist(), orig_area.tolist(), inter_area.tolist())):
        if ma == 0 or oa == 0 or ia == 0 or ma / oa < overlap_threshold:
            continue
        q = keep_l[j]
        c = cls_l[q]
        thing = bool(isthing[c])
        if not thing and c in stuff_ids:
            sid = stuff_ids[c]
            ids[j] = sid
            segments[sid - 1].score = max(segments[sid - 1].score, score_l[q])
            continue
        sid = len(segments) + 1
        if not thing:
            stuff_ids[c] = sid
        ids[j] = sid
        segments.append(Segment(id=sid, category=c, score=score_l[q], isthing=thing, area=0,
                                bbox=(0.0, 0.0, 0.0, 0.0), query=q))
    lut = torch.tensor(ids, dtype=torch.int32, device=device)
    panoptic = torch.where(win_ge, lut[arg], torch.zeros((), dtype=torch.int32, device=device))
    panoptic_map = panoptic.cpu().numpy().astype(np.int32, copy=False)
    if segments:
        _, areas, boxes = segment_stats(panoptic_map, [seg.id for seg in segments])
        for seg, area, box in zip(segments, areas, boxes):
            seg.area, seg.bbox = area, tuple(float(v) for v in box)
    return panoptic_map, segments


def old_instances(source, p_cls, isthing, k, keep_stuff, chunk, device):  # noqa: ANN001, ANN201
    q_total, n = p_cls.shape
    k = max(0, min(int(k), q_total * n))
    if k == 0:
        return []
    p = p_cls.detach().to(device=device, dtype=torch.float32)
    top = torch.sort(p.flatten(), descending=True, stable=True).indices[:k].tolist()
    pairs = [(i // n, i % n) for i in top]
    if not keep_stuff and not all(bool(t) for t in isthing):
        pairs = [(q, c) for q, c in pairs if bool(isthing[c])]
    if not pairs:
        return []
    queries = sorted({q for q, _ in pairs})
    per_query = {}
    qidx = torch.tensor(queries, dtype=torch.int64, device=device)
    for s in range(0, len(queries), chunk):
        idx = qidx[s : s + chunk]
        m = source(idx)
        mask = m > 0
        masked_sig = pp._sigmoid_(m).mul_(mask)
        num = [float(x.sum(dtype=torch.float64)) for x in masked_sig]
        areas = mask.sum(dim=(1, 2)).tolist()
        mask_score = [a / (b + 1e-6) for a, b in zip(num, areas)]
        for i, q in enumerate(idx.tolist()):
            mk = mask[i].to("cpu", copy=True).numpy()
            per_query[q] = (mask_score[i], int(areas[i]), mask_bbox(mk), mk)
    p_cpu = p.cpu()
    found = []
    for q, c in pairs:
        ms, area, box, mk = per_query[q]
        found.append((float(p_cpu[q, c]) * ms, q, c, area, box, mk))
    found.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [Segment(id=r + 1, category=c, score=sc, isthing=bool(isthing[c]), area=area, bbox=box, mask=mk, query=q)
            for r, (sc, q, c, area, box, mk) in enumerate(found)]


def _same(a: Segmentation, b: Segmentation) -> None:
    """Exactly equal: maps, tables, scores, masks."""
    assert a.image_size == b.image_size
    np.testing.assert_array_equal(a.panoptic, b.panoptic)
    np.testing.assert_array_equal(a.semantic, b.semantic)
    for x, y in ((a.segments, b.segments), (a.instances, b.instances)):
        assert len(x) == len(y)
        for column in ("id", "class_id", "isthing", "area", "bbox", "query", "score"):
            np.testing.assert_array_equal(getattr(x, column), getattr(y, column))
    assert len(a.instances.masks) == len(b.instances.masks)
    for m, n in zip(a.instances.masks, b.instances.masks):
        assert m.dtype == n.dtype == bool
        np.testing.assert_array_equal(m, n)


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny():  # noqa: ANN201 - tiny-random with a 4-class vocabulary (copy before changing it)
    torch.set_num_threads(2)
    model = load_model("tiny-random")
    model.set_vocabulary(load_vocabulary(TINY_VOCAB))
    return model


@pytest.fixture(scope="module")
def demo_model():  # noqa: ANN201
    model = load_model("demo")
    model.set_vocabulary(load_vocabulary(str(VOCAB_FILE)))
    return model


CONFIGS = {  # object threshold 0: tiny-random's random scores (max ~0.03) still make panoptic segments
    "default": PostprocessConfig(tasks=TASKS, object_mask_threshold=0.0),
    # small enough that the semantic scores are not cached and every task works chunk by chunk
    "chunked": PostprocessConfig(tasks=TASKS, object_mask_threshold=0.0, chunk_size=3, max_chunk_bytes=1 << 20),
    "resized": PostprocessConfig(tasks=TASKS, object_mask_threshold=0.0, semantic_order="resized",
                                 instance_keep_stuff=True),
}


@pytest.fixture(scope="module")
def by_hand(tiny, demo_model):  # noqa: ANN001, ANN201
    """Per model: the scenes prepared at short side 128 and the model run on them by hand (as Predictor.forward
    used to call it: the CPU tensors straight into the model)."""
    runs = {}
    for name, model in (("tiny", tiny), ("demo", demo_model)):
        predictor = Predictor.for_encoded(model, model.vocabulary, CONFIGS["default"], 128, 2560)
        prepared = [predictor.preprocess(path) for path in SOME]
        with torch.no_grad():
            outputs = model([tensor for _, tensor in prepared])
        runs[name] = (model, prepared, outputs)
    return runs


def _old_postprocess(model, prepared, outputs, config, monkeypatch) -> list[Segmentation]:  # noqa: ANN001
    with monkeypatch.context() as m:
        m.setattr(pp, "_semantic_chunks", old_semantic_chunks)
        m.setattr(pp, "_panoptic", old_panoptic)
        m.setattr(pp, "_instances", old_instances)
        return [postprocess(out.mask_logits, out.p_cls, model.vocabulary.isthing, out.image_size, out.padded_size,
                            rgb.shape[:2], config).with_vocabulary(model.vocabulary)
                for (rgb, _), out in zip(prepared, outputs)]


# ---------------------------------------------------------------------------------------------------- unchanged
@pytest.mark.parametrize("which", ["tiny", "demo"])
def test_predictor_equals_the_model_and_the_former_postprocessing(which, by_hand, monkeypatch):
    model, prepared, outputs = by_hand[which]
    predictor = Predictor.for_encoded(model, model.vocabulary, CONFIGS["default"], 128, 2560)
    new = predictor.predict_batch(SOME)  # staged inputs, one batch as by hand, new post-processing
    old = _old_postprocess(model, prepared, outputs, CONFIGS["default"], monkeypatch)
    assert len(new) == len(old) == len(SOME)
    assert sum(len(s.segments) for s in new) > 0 and sum(len(s.instances) for s in new) > 0
    for a, b in zip(new, old):
        _same(a, b)


@pytest.mark.parametrize("config_name", ["chunked", "resized"])
def test_postprocess_equals_the_former_one(config_name, by_hand, monkeypatch):
    model, prepared, outputs = by_hand["tiny"]
    config = CONFIGS[config_name]
    new = [postprocess(out.mask_logits, out.p_cls, model.vocabulary.isthing, out.image_size, out.padded_size,
                       rgb.shape[:2], config).with_vocabulary(model.vocabulary)
           for (rgb, _), out in zip(prepared, outputs)]
    old = _old_postprocess(model, prepared, outputs, config, monkeypatch)
    assert sum(len(s.segments) for s in new) > 0 and sum(len(s.instances) for s in new) > 0
    for a, b in zip(new, old):
        _same(a, b)


# ---------------------------------------------------------------------------------------------------- on the device
def _watch_host_transfers(monkeypatch) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:  # noqa: ANN001
    """Record every Python-level call that copies a tensor to the host or into Python numbers."""
    events: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    for name in ("cpu", "numpy", "tolist", "item"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            events.append((_name, self.dtype, tuple(self.shape)))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    original_to = torch.Tensor.to

    def to_spy(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if "device" in kwargs or any(isinstance(a, (str, torch.device)) for a in args):
            events.append(("to", self.dtype, tuple(self.shape)))
        return original_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to_spy)
    return events


@pytest.mark.parametrize("config_name", ["default", "chunked"])
def test_no_float_plane_leaves_the_device(config_name, tiny, monkeypatch):
    image = torch.randint(0, 256, (3, 128, 176), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    (out,) = tiny([image])
    q, n = out.p_cls.shape
    h, w = 150, 200  # an output size other than the model's input size: every resize runs
    assert out.mask_logits[0].numel() > q * n  # so a mask plane cannot pass for a score table
    config = CONFIGS[config_name]
    expected = postprocess(out.mask_logits, out.p_cls, tiny.vocabulary.isthing, out.image_size, out.padded_size,
                           (h, w), config)
    events = _watch_host_transfers(monkeypatch)
    seg = postprocess(out.mask_logits, out.p_cls, tiny.vocabulary.isthing, out.image_size, out.padded_size, (h, w),
                      config)
    monkeypatch.undo()
    _same(seg, expected)
    assert len(seg.instances) > 0 and len(seg.segments) > 0
    big_float = [e for e in events if e[1].is_floating_point and int(np.prod(e[2])) > q * n]
    assert big_float == [], big_float
    # the final results are what comes back: the maps and the instances' bool masks
    assert ("numpy", torch.int32, (h, w)) in events
    assert any(name == "numpy" and dtype == torch.bool and shape[1:] == (h, w) for name, dtype, shape in events)
    host_planes = [e for e in events if e[0] in ("cpu", "numpy") and len(e[2]) == 3]
    assert all(e[1] == torch.bool for e in host_planes), host_planes


def test_stage_inputs_is_a_no_op_on_cpu():
    tensors = [torch.zeros(3, 4, 5, dtype=torch.uint8), torch.ones(3, 6, 2, dtype=torch.uint8).permute(0, 2, 1)]
    staged = stage_inputs(tensors, "cpu")
    assert len(staged) == 2 and all(a is b for a, b in zip(staged, tensors))
    assert stage_inputs(tensors, torch.device("cpu"))[1] is tensors[1]


def test_stage_inputs_pins_and_copies_non_blocking_for_cuda(monkeypatch):
    """No GPU here: torch.empty(pin_memory=True) and Tensor.to(cuda) are faked, recording how they were called."""
    calls = []
    real_empty, real_to = torch.empty, torch.Tensor.to

    def fake_empty(*shape, pin_memory=False, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(("empty", pin_memory))
        return real_empty(*shape, **kwargs)

    def fake_to(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        device = torch.device(args[0]) if args and isinstance(args[0], (str, torch.device)) else None
        if device is not None and device.type == "cuda":
            calls.append(("to", device.type, kwargs.get("non_blocking", False), self.is_contiguous()))
            return self.clone()
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch, "empty", fake_empty)
    monkeypatch.setattr(torch.Tensor, "to", fake_to)
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randint(0, 256, (3, 7, 5), generator=g, dtype=torch.uint8),
               torch.randint(0, 256, (9, 4, 3), generator=g, dtype=torch.uint8).permute(2, 0, 1)]  # a view
    staged = stage_inputs(tensors, "cuda")
    monkeypatch.undo()
    assert calls == [("empty", True), ("to", "cuda", True, True)] * 2
    for a, b in zip(staged, tensors):
        assert torch.equal(a, b) and a.dtype == torch.uint8


# ---------------------------------------------------------------------------------------------------- compile
def _images() -> list[Tensor]:
    return [torch.randint(0, 256, (3, 64, 96), generator=torch.Generator().manual_seed(7), dtype=torch.uint8)]


@pytest.fixture(scope="module")
def eager(tiny):  # noqa: ANN001, ANN201 - the eager outputs on _images()
    return tiny(_images())


def _outputs_equal(a, b) -> None:  # noqa: ANN001
    for x, y in zip(a, b):
        assert torch.equal(x.mask_logits, y.mask_logits) and torch.equal(x.p_cls, y.p_cls)


@pytest.mark.parametrize("when", ["setup", "first call"])
def test_compile_failure_falls_back_to_eager_with_one_line(when, tiny, eager, monkeypatch):
    model = copy.deepcopy(tiny)

    def broken_compile(fn, **kwargs):  # noqa: ANN001, ANN003, ANN202
        if when == "setup":
            raise RuntimeError("no C++ compiler found\nsecond line")

        def compiled(*args, **kw):  # noqa: ANN002, ANN003, ANN202
            raise RuntimeError("BackendCompilerFailed: inductor\ntraceback ...")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    messages: list[str] = []
    compile_model(model, on_fallback=messages.append)
    assert is_compiled(model)
    _outputs_equal(model(_images()), eager)
    if when == "first call":  # the fallback is for good: the compiled code is not tried again
        _outputs_equal(model(_images()), eager)
    assert len(messages) == 1 and "\n" not in messages[0] and "running eager" in messages[0]
    assert "RuntimeError" in messages[0]


def test_compile_uses_the_compiled_forward(tiny, eager, monkeypatch):
    model = copy.deepcopy(tiny)
    used: list[str] = []

    def fake_compile(fn, **kwargs):  # noqa: ANN001, ANN003, ANN202
        assert kwargs == {"mode": "reduce-overhead"}

        def compiled(*args, **kw):  # noqa: ANN002, ANN003, ANN202
            used.append(fn.__self__.__class__.__name__)
            return fn(*args, **kw)

        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    compile_model(model, on_fallback=pytest.fail, mode="reduce-overhead")
    compile_model(model, on_fallback=pytest.fail)  # already compiled: nothing happens (no second wrapper)
    _outputs_equal(model(_images()), eager)
    assert sorted(used) == ["MasQVisual", "ProposalNetwork"]  # each part once, through its compiled forward


def test_predictor_compile_option(tiny, monkeypatch):
    model = copy.deepcopy(tiny)
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(fn) or fn)
    Predictor(model, compile=False)
    assert not is_compiled(model) and seen == []
    Predictor(model, compile=True)
    assert is_compiled(model) and len(seen) == 2  # the proposal network and the MasQ tower


def test_compile_does_not_hide_out_of_memory(tiny, monkeypatch):
    model = copy.deepcopy(tiny)

    def oom_compile(fn, **kwargs):  # noqa: ANN001, ANN003, ANN202
        def compiled(*args, **kw):  # noqa: ANN002, ANN003, ANN202
            raise torch.OutOfMemoryError("CUDA out of memory")

        return compiled

    monkeypatch.setattr(torch, "compile", oom_compile)
    compile_model(model, on_fallback=pytest.fail)
    with pytest.raises(torch.OutOfMemoryError):
        model(_images())


def test_compile_without_callback_warns(tiny, monkeypatch):
    model = copy.deepcopy(tiny)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: (_ for _ in ()).throw(RuntimeError("nope")))
    with pytest.warns(RuntimeWarning, match="running eager"):
        compile_model(model)
    (out,) = model(_images()[:1])
    assert out.p_cls.shape[1] == 4


# ---------------------------------------------------------------------------------------------------- segment
def _segment(out: Path, *extra: str) -> str:
    args = ["segment", str(IMAGES), "--model", "tiny-random", "--vocab", TINY_VOCAB, "--task", ",".join(TASKS),
            "--short-side", "64", "--device", "cpu", "--threads", "2", "--out", str(out), *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.stderr


def _folder(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_segment_workers_and_compile_fallback_write_identical_folders(tmp_path, monkeypatch):
    _segment(tmp_path / "w1", "--workers", "1")
    _segment(tmp_path / "w3", "--workers", "3")
    one, three = _folder(tmp_path / "w1"), _folder(tmp_path / "w3")
    assert len([k for k in one if k.startswith("panoptic/")]) == len(SCENES)
    assert one == three

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: (_ for _ in ()).throw(RuntimeError("no compiler")))
    stderr = _segment(tmp_path / "c", "--compile", "--workers", "2")
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "torch.compile failed" in warnings[0] and "running eager" in warnings[0]
    assert _folder(tmp_path / "c") == one  # the eager path; --compile is not part of the run's fingerprint


def test_producer_keeps_listing_order_with_uneven_decode_times(monkeypatch):
    items = [SourceItem(f"img{i}", Path(f"img{i}.png")) for i in range(12)]
    delays = {f"img{i}": (0.03 if i % 3 == 0 else 0.0) for i in range(12)}  # every third item is slow
    threads: set[str] = set()

    def fake_decode(decode, item, options):  # noqa: ANN001, ANN202
        threads.add(threading.current_thread().name)
        time.sleep(delays[item.id])
        return np.zeros((2, 2, 3), np.uint8), torch.zeros(3, 2, 2, dtype=torch.uint8)

    monkeypatch.setattr(engine, "decode_for_model", fake_decode)
    for workers in (1, 4):
        out: queue.Queue = queue.Queue()
        engine._producer(items, engine.RunOptions(workers=workers), out, threading.Event())
        got = []
        while (entry := out.get()) is not None:
            got.append(entry[0].id)
        assert got == [item.id for item in items]
    assert len([t for t in threads if t.startswith("masqclip-decode")]) > 1  # 4 workers: several threads decoded
