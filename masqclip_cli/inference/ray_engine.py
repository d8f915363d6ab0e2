"""``masqclip segment --engine ray``: the segment engine on a Ray cluster, for runs that outgrow one machine.

::

    driver (this process; holds --out's run lock)
      the same fingerprint, listing, shard and resume as a local run (engine.open_run / plan_run)
        │ ray.data.from_items(the items to do: id + absolute path)
        ▼
    decode: Ray tasks on CPUs -- the same decoding and test resize as a local run (engine.decode_for_model)
        ▼
    model workers: a Ray Data actor pool (map_batches with a callable class; a fixed size or an autoscaling
      MIN..MAX range; num_gpus / num_cpus each). Each worker builds the model from the model source the command
      resolved (ModelSpec: a registered name or a file path, never pickled weights), sets the vocabulary as a local
      run does, and runs engine._run_batch: each item's result, files and record written exactly as a local run
      writes them (atomically, per item, into --out, which must be a folder every node sees)
        ▼
    driver: one row per item (done / skipped / failed, seconds) into the RunSummary; at the end the run-level files
      assembled from the stored records (engine.assemble_run), as a local run.

The engine is not part of the run fingerprint: a Ray run and a local run over one ``--out`` resume each other, and a
run over a complete ``--out`` computes nothing (no Ray is even started).

Faults: Ray Data restarts a model worker whose process died (``max_restarts=-1``) and retries its batch
(``max_task_retries``); a decode task whose worker died is retried (``max_retries``). A dead worker costs the items
of the batches it held, nothing else. A batch that kills its worker on every try (``task_retries + 1`` times) is
dropped and its items are reported failed; the run goes on.

Only images: tracked sequences (``--track``, ``--sequence``, video sources) stay with the local engine
(:class:`RayEngineError`).

Ray is imported here only, lazily, when a run needs it: importing ``masqclip_cli`` never imports it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from masqclip_cli.inference.engine import (
    RunOptions,
    RunPlan,
    RunSummary,
    _Decoder,
    _InFlight,
    _item_info,
    _run_batch,
    assemble_run,
    decode_for_model,
    io_failure,
    mark_incomplete,
    open_run,
    plan_run,
    run_fingerprint,
    run_locked,
)
from masqclip_cli.inference.predictor import Predictor
from masqclip_cli.io.sources import SkipItem, SourceItem, spec_kind
from masqclip_cli.io.writers import make_writers
from masqclip_cli.modeling.factory import load_model, resolve_device
from masqclip_cli.modeling.masqclip import MasQCLIP
from masqclip_cli.modeling.text import TextEmbeddingCache
from masqclip_cli.vocab import Vocabulary

__all__ = [
    "RAY_MISSING",
    "ModelSpec",
    "RayEngineError",
    "RayNotInstalledError",
    "RayOptions",
    "parse_workers",
    "require_ray",
    "segment_ray",
]

RAY_MISSING = "the Ray engine needs Ray: pip install 'masqclip[ray]'"
#: Environment variables of masqclip that the workers get from the driver (cache and models folders, downloads).
_FORWARDED_ENV_PREFIX = "MASQCLIP_"


class RayNotInstalledError(RuntimeError):
    """Ray is not installed (or cannot be imported)."""


class RayEngineError(ValueError):
    """A run the Ray engine does not do (tracked sequences, video frames, no output folder)."""


def require_ray() -> Any:
    """The ``ray`` module, with Ray Data; :class:`RayNotInstalledError` (:data:`RAY_MISSING`) without it."""
    try:
        import ray
        import ray.data  # noqa: F401 - the engine needs Ray Data, not only the core
    except ImportError:
        raise RayNotInstalledError(RAY_MISSING) from None
    return ray


def parse_workers(spec: str | int) -> tuple[int, int]:
    """``(min, max)`` model workers from ``"N"`` (a fixed pool of N) or ``"MIN-MAX"`` (autoscaling between them);
    ValueError naming the problem otherwise."""
    text = str(spec).strip()
    low, sep, high = text.partition("-")
    try:
        bounds = (int(low), int(high) if sep else int(low))
    except ValueError:
        raise ValueError(f"expected N or MIN-MAX (e.g. 4 or 2-8), got '{spec}'") from None
    if bounds[0] < 1 or bounds[1] < bounds[0]:
        raise ValueError(f"expected N or MIN-MAX with 1 <= MIN <= MAX, got '{spec}'")
    return bounds


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a Ray run goes (none of this changes what is written)."""

    #: The cluster: ``"auto"`` (the one ``ray start`` made on this machine), ``"ray://host:10001"``, ``host:6379``;
    #: None: ``$RAY_ADDRESS`` when set, else a Ray instance started here for the run (and stopped after it).
    address: str | None = None
    #: Model workers: ``(n, n)`` a fixed pool, ``(min, max)`` autoscaling.
    workers: tuple[int, int] = (1, 1)
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    #: CPUs each decode task takes.
    decode_cpus: float = 1.0
    #: A batch is tried again this many times after its model worker died (then its items are reported failed).
    task_retries: int = 3


@dataclass(frozen=True)
class ModelSpec:
    """How each model worker builds the model: as the command line does, from the model source it resolved (a
    registered name or a file every node can read), not from pickled weights.

    Attributes:
        source: a registered model name or the absolute path of a model file.
        device: ``auto`` (``cuda`` on a worker given GPUs, else ``cpu``) or a torch device.
        precision: ``fp32``, ``bf16`` or ``fp16``.
        use_object_score: p_cls = p_obj · p_clip (True) or p_clip alone.
        vocabulary: encoded with the text tower in each worker (cached as locally); None: the model's stored one.
        templates: prompt templates for encoding ``vocabulary`` (None: the model's default).
        threads: torch CPU threads in each worker (None: Ray's ``OMP_NUM_THREADS``, the worker's CPUs).
    """

    source: str
    device: str = "auto"
    precision: str = "fp32"
    use_object_score: bool = True
    vocabulary: Vocabulary | None = None
    templates: tuple[str, ...] | None = None
    threads: int | None = None

    def build(self, device: str | None = None) -> MasQCLIP:
        """The model, on ``device`` (default: :attr:`device`, ``auto`` resolved here), vocabulary set."""
        net = load_model(self.source, device=device or resolve_device(self.device), precision=self.precision)
        net.use_object_score = self.use_object_score
        if self.vocabulary is not None:
            net.set_vocabulary(self.vocabulary, templates=list(self.templates) if self.templates is not None else None,
                               cache=TextEmbeddingCache(), progress=False)
        return net


@dataclass(frozen=True)
class _WorkerJob:
    """What a model worker needs (small: names, options, paths; pickled once per worker)."""

    spec: ModelSpec
    vocab: Vocabulary
    options: RunOptions
    out_dir: str


def _decode_batch(batch: dict[str, np.ndarray], options: RunOptions, with_image: bool) -> dict[str, np.ndarray]:
    """Ray task: decode chunks of items (``ids``, ``paths``: one model batch each) as a local run does; one row per
    item, of raw bytes and sizes (the full image only when a writer draws on it: otherwise its size is all the
    model worker needs)."""
    decode = _Decoder(options)
    rows: dict[str, list] = {k: [] for k in ("id", "path", "skip", "height", "width", "rgb", "model_height",
                                            "model_width", "tensor", "decode_s")}
    pairs = [(i, p) for ids, paths in zip(batch["ids"], batch["paths"]) for i, p in zip(ids, paths)]
    for item_id, path in pairs:
        start = time.perf_counter()
        item = SourceItem(id=str(item_id), path=Path(str(path)))
        payload = decode_for_model(decode, item, options)
        rows["id"].append(item.id)
        rows["path"].append(str(path))
        if isinstance(payload, SkipItem):
            rows["skip"].append(str(payload))
            rows["height"].append(0), rows["width"].append(0), rows["rgb"].append(b"")
            rows["model_height"].append(0), rows["model_width"].append(0), rows["tensor"].append(b"")
        else:
            rgb, tensor = payload
            rows["skip"].append("")
            rows["height"].append(rgb.shape[0]), rows["width"].append(rgb.shape[1])
            rows["rgb"].append(np.ascontiguousarray(rgb).tobytes() if with_image else b"")
            rows["model_height"].append(int(tensor.shape[1])), rows["model_width"].append(int(tensor.shape[2]))
            rows["tensor"].append(tensor.permute(1, 2, 0).contiguous().numpy().tobytes())
        rows["decode_s"].append(time.perf_counter() - start)
    return {k: np.array(v, dtype=object if k in ("id", "path", "skip", "rgb", "tensor") else None)
            for k, v in rows.items()}


_NO_PIXELS = np.zeros((1, 1, 3), dtype=np.uint8)


class _SegmentWorker:
    """A model worker of the pool (a Ray Data callable class): builds the model and writers once, then runs
    batches through the engine's ``_run_batch`` (one row out per row in)."""

    def __init__(self, job: _WorkerJob) -> None:
        import ray

        if job.spec.threads:
            torch.set_num_threads(job.spec.threads)
        device = job.spec.device
        if device == "auto":  # the GPUs Ray gave this worker, else the CPU (never a GPU it was not given)
            device = resolve_device("auto") if ray.get_gpu_ids() else "cpu"
        self.job = job
        model = job.spec.build(device)
        options = job.options
        if getattr(options, "compile", False):  # as the command line compiles a local run's model
            from masqclip_cli.modeling.runtime import compile_model

            compile_model(model)  # a fallback to eager is a RuntimeWarning in the worker's log (shown by Ray)
        self.predictor = Predictor.for_encoded(model, job.vocab, options.postprocess, options.short_side,
                                               options.max_size)
        self.out_dir = Path(job.out_dir)
        self.writers = make_writers(options.formats, self.out_dir, options.writer_vocabulary(job.vocab),
                                    **options.writer_options)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        status, reason, info = [""] * n, [""] * n, [""] * n
        work: list[tuple[SourceItem, np.ndarray, torch.Tensor]] = []
        index: dict[str, int] = {}
        for k in range(n):
            item_id = str(batch["id"][k])
            if batch["skip"][k]:
                status[k], reason[k] = "skipped", str(batch["skip"][k])
                continue
            height, width = int(batch["height"][k]), int(batch["width"][k])
            rgb = (np.frombuffer(batch["rgb"][k], dtype=np.uint8).reshape(height, width, 3).copy() if batch["rgb"][k]
                   else np.broadcast_to(_NO_PIXELS, (height, width, 3)))  # only its size is read
            hwc = np.frombuffer(batch["tensor"][k], dtype=np.uint8).reshape(int(batch["model_height"][k]),
                                                                            int(batch["model_width"][k]), 3)
            work.append((SourceItem(id=item_id, path=Path(str(batch["path"][k]))), rgb,
                         torch.from_numpy(hwc.copy()).permute(2, 0, 1)))  # as prepare_image lays it out
            index[item_id] = k
        summary = RunSummary()
        if work:
            for item_id, record in _run_batch(self.predictor, work, self.writers, self.out_dir, summary,
                                              self.job.options):
                if record is not None:
                    k = index[item_id]
                    status[k] = "done"
                    info[k] = json.dumps({key: record[key] for key in ("id", "file_name", "width", "height",
                                                                       "source") if key in record})
        failed = dict(summary.failed)
        for item_id, k in index.items():
            if not status[k]:
                if item_id in failed:
                    status[k], reason[k] = "failed", failed[item_id]
                else:  # an I/O failure that stops the run (no space, read-only, no permission)
                    status[k], reason[k] = "fatal", summary.fatal or f"{item_id}: not written"
        seconds = {key: np.zeros(n) for key in ("model", "postprocess", "write")}
        for key in seconds:  # the batch's times on its first row: the driver adds them up
            seconds[key][0] = summary.seconds.get(key, 0.0)
        return {"id": np.array([str(i) for i in batch["id"]], dtype=object),
                "status": np.array(status, dtype=object), "reason": np.array(reason, dtype=object),
                "info": np.array(info, dtype=object), "decode_s": np.asarray(batch["decode_s"], dtype=np.float64),
                **{f"{key}_s": value for key, value in seconds.items()}}


def _check_images_only(source: str, options: RunOptions) -> None:
    if options.tracks(source):
        raise RayEngineError(f"{source}: the Ray engine does not track sequences (tracking, sequence, or a video "
                             "source): run it with the local engine")
    if spec_kind(source) == "video":
        raise RayEngineError(f"{source}: the Ray engine runs images only; a video's frames need the local engine")


def segment_ray(
    spec: ModelSpec,
    vocab: Vocabulary,
    source: str,
    out_dir: Path,
    options: RunOptions,
    model_id: str,
    ray_options: RayOptions = RayOptions(),
    on_item: Callable[[str, int, int | None], None] | None = None,
    stdin: Any = None,
) -> RunSummary:
    """:func:`masqclip_cli.inference.engine.segment` on a Ray cluster: the same outputs, fingerprint, resume and
    summary, the model in a pool of Ray workers (see the module docstring).

    Args:
        spec: how each worker builds the model (the fingerprint takes ``spec.use_object_score``,
            ``spec.precision`` and ``spec.templates`` from it, as a local run takes them from its model).
        vocab: the run's vocabulary (``spec.vocabulary``, or the model's stored one).
        source: a path, directory, glob, list file or ``-`` (stdin) of images.
        out_dir: the output folder, on a filesystem every node of the cluster sees.
        options: run options (as for a local run; ``batch_size`` images per model call).
        model_id: identity of the model for the fingerprint (:func:`~masqclip_cli.modeling.runtime.model_identity`).
        ray_options: the cluster and the pool.
        on_item: progress callback (item id, items finished so far, total).

    Returns:
        A :class:`~masqclip_cli.inference.engine.RunSummary`. Raises :class:`RayNotInstalledError`,
        :class:`RayEngineError` (a run it does not do), and what a local run raises
        (``FingerprintMismatchError``, ``RunLockedError``, ``SourceError``).
    """
    if out_dir is None:
        raise RayEngineError("the Ray engine writes into an output folder (out_dir); it cannot stream")
    _check_images_only(source, options)
    require_ray()
    out_dir = Path(os.path.abspath(out_dir))
    return run_locked(out_dir, lambda read_only: _segment_ray(spec, vocab, source, out_dir, options, model_id,
                                                              ray_options, on_item, stdin, read_only))


def _segment_ray(spec: ModelSpec, vocab: Vocabulary, source: str, out_dir: Path, options: RunOptions, model_id: str,
                 ray_options: RayOptions, on_item: Callable[[str, int, int | None], None] | None, stdin: Any,
                 read_only: bool) -> RunSummary:
    t_start = time.perf_counter()
    summary = RunSummary()
    options = replace(options, writer_options={k: v for k, v in options.writer_options.items() if k != "stream"})
    writers = make_writers(options.formats, out_dir, options.writer_vocabulary(vocab), **options.writer_options)
    try:
        open_run(out_dir, run_fingerprint(model_id, vocab, list(spec.templates) if spec.templates is not None
                                          else None, options, spec.use_object_score, spec.precision,
                                          tracks=False), options.overwrite, read_only)
    except OSError as exc:
        summary.fatal = io_failure(exc)
        summary.wall_s = time.perf_counter() - t_start
        return summary
    plan = plan_run(source, out_dir, options, writers, summary, stdin)
    framed = next((item for item in plan.todo if item.frame is not None), None)
    if framed is not None:
        raise RayEngineError(f"{framed.id}: the Ray engine runs images only; a video's frames need the local engine")
    inflight = _InFlight(out_dir, read_only)  # items that took a local run's process down twice stay skipped
    todo = []
    for item in plan.todo:
        crashed = inflight.skip_reason(item.id)
        if crashed:
            summary.skipped.append((item.id, crashed))
        else:
            todo.append(item)
    if todo:
        try:
            mark_incomplete(out_dir)
            inflight.open()  # only "done" lines: the driver never holds an item a crash could be blamed on
        except OSError as exc:
            summary.fatal = io_failure(exc)
            summary.wall_s = time.perf_counter() - t_start
            return summary
        try:
            _run_on_ray(todo, spec, vocab, out_dir, options, ray_options, writers, plan, summary, on_item, inflight)
        finally:
            try:
                inflight.close()
            except OSError as exc:
                summary.fatal = summary.fatal or io_failure(exc)
    assemble_run(out_dir, writers, plan, summary)
    summary.wall_s = time.perf_counter() - t_start
    return summary


def _run_on_ray(todo: Sequence[SourceItem], spec: ModelSpec, vocab: Vocabulary, out_dir: Path, options: RunOptions,
                ray_options: RayOptions, writers: Sequence[Any], plan: RunPlan, summary: RunSummary,
                on_item: Callable[[str, int, int | None], None] | None, inflight: _InFlight) -> None:
    """Stream ``todo`` through decode tasks and the model-worker pool; fill ``summary`` and ``plan.infos``."""
    ray = require_ray()
    started_here = not ray.is_initialized()
    if started_here:
        address = ray_options.address or os.environ.get("RAY_ADDRESS") or None
        kwargs: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": True}
        if address is None:
            kwargs["include_dashboard"] = False
        try:
            ray.init(address=address, **kwargs)
        except Exception as exc:  # noqa: BLE001 - no cluster there, refused, another Ray version: one line
            where = f"the Ray cluster at {address}" if address else "a local Ray instance"
            summary.fatal = f"cannot connect to {where}: {_first_line(exc)}"
            return
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.max_errored_blocks = -1  # a batch that killed its worker on every retry: its items fail, the run goes on
    env = {k: v for k, v in os.environ.items() if k.startswith(_FORWARDED_ENV_PREFIX)}
    job = _WorkerJob(spec=spec, vocab=vocab, options=options, out_dir=str(out_dir))
    # one block per model batch: consecutive listed items, as a local run batches them (the batch composition is
    # part of what makes the outputs bit-identical; an item skipped at decode leaves its chunk one short)
    size = max(1, options.batch_size)
    chunks = [todo[k : k + size] for k in range(0, len(todo), size)]
    items = [{"ids": [item.id for item in chunk], "paths": [str(Path(item.path).resolve()) for item in chunk]}
             for chunk in chunks]
    min_workers, max_workers = ray_options.workers
    pool = (ray.data.ActorPoolStrategy(size=min_workers) if min_workers == max_workers
            else ray.data.ActorPoolStrategy(min_size=min_workers, max_size=max_workers))
    seen: set[str] = set()
    finished = summary.reused
    rows: Any = None
    try:
        with warnings.catch_warnings():  # Ray >= 2.5x prefers named remote parameters; these keep older Rays working
            warnings.simplefilter("ignore", DeprecationWarning)
            ds = ray.data.from_items(items, override_num_blocks=len(items))
            ds = ds.map_batches(_decode_batch, batch_format="numpy", batch_size=None,
                                fn_kwargs={"options": options,
                                           "with_image": any(w.needs_image for w in writers)},
                                num_cpus=ray_options.decode_cpus, runtime_env={"env_vars": env} if env else None,
                                max_retries=ray_options.task_retries)
            ds = ds.map_batches(_SegmentWorker, batch_format="numpy", batch_size=None,  # a block: one chunk
                                compute=pool, fn_constructor_kwargs={"job": job},
                                num_cpus=ray_options.cpus_per_worker, num_gpus=ray_options.gpus_per_worker or None,
                                runtime_env={"env_vars": env} if env else None,
                                max_restarts=-1, max_task_retries=ray_options.task_retries)
        rows = iter(ds.iter_rows())
        for row in rows:
            item_id, status = str(row["id"]), str(row["status"])
            summary.seconds["decode"] += float(row["decode_s"])
            for key in ("model", "postprocess", "write"):
                summary.seconds[key] += float(row[f"{key}_s"])
            if item_id in seen:  # never twice, whatever a retry returned
                continue
            if status == "fatal":
                summary.fatal = summary.fatal or str(row["reason"])
                break
            seen.add(item_id)
            if status == "done":
                summary.done += 1
                plan.infos[item_id] = _item_info(json.loads(row["info"]))
            elif status == "skipped":
                summary.skipped.append((item_id, str(row["reason"])))
            else:
                summary.failed.append((item_id, str(row["reason"])))
            inflight.finished(item_id)
            finished += 1
            if on_item:
                on_item(item_id, finished, plan.total)
        else:
            for item in todo:  # their batch killed its worker on every try: dropped by Ray Data
                if item.id not in seen:
                    summary.failed.append((item.id, f"{item.id}: the model worker died on it "
                                           f"{ray_options.task_retries + 1} times (out of memory, or a crash): "
                                           "not written"))
    except KeyboardInterrupt:
        summary.interrupted = True
    except OSError as exc:
        summary.fatal = summary.fatal or io_failure(exc)
    except Exception as exc:  # noqa: BLE001 - the cluster failed (a worker that cannot start, a lost driver link)
        summary.fatal = summary.fatal or f"the Ray run failed: {_first_line(exc)}"
    finally:
        if rows is not None and hasattr(rows, "close"):  # stops the pipeline: Ray Data ends its workers
            try:
                rows.close()
            except Exception:  # noqa: BLE001, S110 - a pipeline that failed may fail again on the way out
                pass
        if started_here:
            ray.shutdown()


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAISED = re.compile(r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception)): (.+)$")


def _first_line(exc: BaseException) -> str:
    """A Ray error as one line: the exception a worker raised (Ray carries it as text, traceback included: its last
    ``SomeError: message`` line), else the error's own first line."""
    seen: list[BaseException] = []
    error: BaseException | None = exc
    while error is not None and error not in seen:
        seen.append(error)
        lines = [_ANSI.sub("", line).strip() for line in str(error).splitlines()]
        raised = [m for m in map(_RAISED.match, lines) if m]
        if raised:
            return f"{raised[-1].group(1)}: {raised[-1].group(2)}"[:500]
        error = error.__cause__ or error.__context__
    for error in seen:
        text = [line for line in (_ANSI.sub("", ln).strip() for ln in str(error).splitlines()) if line]
        if text:
            return f"{type(error).__name__}: {text[0]}"[:500]
    return type(exc).__name__

