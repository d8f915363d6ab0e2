"""``masqclip train``: the training loop that runs the stage recipes of :mod:`.stages` (METHOD.md §3).

:func:`train` sets up the processes and hands the configured stage's recipe a ``run_phase`` callable; each
:class:`~masqclip_cli.training.phase.Phase` the recipe builds (what to optimise, how one step computes its losses)
is run here by :class:`_PhaseRunner`.

Infrastructure: ``torchrun`` DistributedDataParallel (gloo on CPU, NCCL on CUDA) with the global batch split over
processes and every random draw seeded per (seed, iteration, sample) so that 1 and N processes compute the same
step; AMP on CUDA; AdamW with the backbone at lr × 0.1 and no weight decay on norms and embeddings; full-model
gradient clipping; a step schedule computed from the iteration alone; ``checkpoint.pt`` every N iterations with
exact resume (weights, optimiser, scaler, RNG; the data position is the iteration); ``final.safetensors`` in our
model format; periodic evaluation; a JSONL metrics log and a rich progress display.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from masqclip_cli.modeling.factory import save_model
from masqclip_cli.training import stages
from masqclip_cli.training.config import ConfigError, TrainConfig
from masqclip_cli.training.data import iterate_batches
from masqclip_cli.training.phase import FINAL, Phase, Runtime, TrainResult

__all__ = ["TrainResult", "lr_factor", "param_groups", "train"]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
_NORM_TYPES = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d, nn.SyncBatchNorm, nn.InstanceNorm2d)
_EMBEDDING_NAMES = ("query_feat", "query_embed", "level_embed", "mask_pos_embed", "positional_embedding",
                    "class_embedding")

# The stage helpers' former names here (callers and tests use them).
_attach_clip = stages.attach_clip
_proposals_model = stages.proposals_model
_class_map = stages.class_map


# ------------------------------------------------------------------------------------------------ optimiser
def lr_factor(iteration: int, steps: list[float], total: int, gamma: float) -> float:
    """The multiplier of the base lr at ``iteration``: ``gamma ** (number of milestones <= iteration)``; a milestone
    below 1 is a fraction of ``total`` iterations (rounded), else an iteration number."""
    milestones = [int(round(s * total)) if s < 1 else int(s) for s in steps]
    return float(gamma) ** sum(iteration >= m for m in milestones)


def param_groups(module: nn.Module, lr: float, weight_decay: float, backbone_multiplier: float = 1.0,
                 backbone_prefix: str = "backbone.") -> list[dict[str, Any]]:
    """AdamW parameter groups of the trainable parameters of ``module`` (the detectron2 / Mask2Former rules):
    parameters under ``backbone_prefix`` get ``lr × backbone_multiplier``; parameters of normalisation layers and
    embeddings (``nn.Embedding``, query/level/position embeddings) get no weight decay."""
    no_decay: set[int] = set()
    for _name, mod in module.named_modules():
        if isinstance(mod, (*_NORM_TYPES, nn.Embedding)):
            no_decay.update(id(p) for p in mod.parameters(recurse=False))
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        decay = 0.0 if id(param) in no_decay or name.split(".")[-1] in _EMBEDDING_NAMES \
            or any(n in name for n in ("query_feat", "query_embed", "level_embed")) else weight_decay
        rate = lr * backbone_multiplier if name.startswith(backbone_prefix) else lr
        groups.setdefault((rate, decay), []).append(param)
    return [{"params": ps, "lr": rate, "initial_lr": rate, "weight_decay": decay}
            for (rate, decay), ps in groups.items()]


# ------------------------------------------------------------------------------------------------ distributed
def _setup(config: TrainConfig) -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    wanted = config.device
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device 'cuda': no CUDA device is available")
    if world <= 1:
        return Runtime(device=torch.device(wanted))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if wanted.startswith("cuda") else "gloo"
        if wanted.startswith("cuda"):
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
        owns = True
    device = torch.device(f"cuda:{local_rank}") if wanted.startswith("cuda") else torch.device("cpu")
    return Runtime(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, device=device,
                   owns_group=owns)


# ------------------------------------------------------------------------------------------------ the loop
def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_RESUME_KEYS = ("stage", "seed", "batch_size", "dataset", "split", "augment", "size", "lr", "tune", "proposals",
                "rounds", "classes")


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rewrite_metrics(path: Path, completed: int) -> None:
    """Drop log lines of iterations a resumed run will redo (written after the checkpoint of ``completed``
    iterations it resumes from)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("iteration", 0) <= completed:
                kept.append(line)
        except json.JSONDecodeError:
            continue
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
    os.replace(tmp, path)


class _PhaseRunner:
    """Runs one :class:`Phase` (the teacher, one distillation round, or MasQ-tuning) writing into its folder: the
    optimiser, DDP, AMP, checkpoints and resume, the logs, the progress display and the periodic evaluation."""

    def __init__(self, phase: Phase, config: TrainConfig, env: Runtime, console: Any = None,
                 on_step: Callable[[str, int], None] | None = None) -> None:
        self.config, self.env, self.folder, self.model = config, env, phase.folder, phase.model
        self.trainable, self.step_fn, self.data, self.name = phase.trainable, phase.step, phase.data, phase.name
        self.evaluate, self.save_extra, self.console = phase.evaluate, phase.save_extra, console
        self.on_step = on_step
        trainable = phase.trainable
        self.groups = param_groups(trainable, config.lr, config.weight_decay, config.backbone_lr_multiplier,
                                   phase.backbone_prefix)
        if not self.groups:
            raise ConfigError("nothing to train: no parameter requires a gradient")
        self.params = [p for g in self.groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(self.groups, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda it: lr_factor(it, config.lr_steps, config.iterations, config.lr_gamma))
        amp = config.amp
        if amp == "auto":
            amp = "fp16" if env.device.type == "cuda" and config.precision == "fp32" else "off"
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16" and env.device.type == "cuda")
        forward = phase.forward if phase.forward is not None else trainable
        self.wrapped: nn.Module = forward
        if env.world > 1:
            self.wrapped = nn.parallel.DistributedDataParallel(
                forward, device_ids=[env.local_rank] if env.device.type == "cuda" else None,
                broadcast_buffers=False)

    # --- checkpoints
    def _trainable_state(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.trainable.state_dict().items() if not k.startswith("visual.")}

    def save_checkpoint(self, iteration: int) -> None:
        if not self.env.main:
            return
        state = {
            "format": "masqclip-train-checkpoint/1",
            "phase": self.name,
            "iteration": iteration,
            "model": self._trainable_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": _rng_state(),
            "config": {k: getattr(self.config, k) for k in _RESUME_KEYS},
        }
        _atomic_torch_save(state, self.folder / CHECKPOINT)

    def load_checkpoint(self) -> int:
        path = self.folder / CHECKPOINT
        if not (self.config.resume and path.exists()):
            return 0
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"{path}: cannot read the checkpoint ({exc}); delete it or train with resume=False"
                              ) from None
        if state.get("phase") != self.name:
            raise ConfigError(f"{path}: is a checkpoint of '{state.get('phase')}', not '{self.name}'")
        saved = state.get("config", {})
        changed = [k for k in _RESUME_KEYS if k in saved and saved[k] != getattr(self.config, k)]
        if changed:
            k = changed[0]
            raise ConfigError(f"{path}: made with {k}={saved[k]!r}, now {k}={getattr(self.config, k)!r}; use another "
                              "output folder, or resume=False to start over")
        missing, unexpected = self.trainable.load_state_dict(state["model"], strict=False)
        unexpected = [k for k in unexpected if not k.startswith("visual.")]
        missing = [k for k in missing if not k.startswith("visual.")]
        if missing or unexpected:
            raise ConfigError(f"{path}: does not fit the model ({(missing + unexpected)[:3]})")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        return int(state["iteration"])

    # --- the loop
    def run(self) -> TrainResult:
        with _StopOnSignal() as stop:
            return self._run(stop)

    def _run(self, stop: _StopOnSignal) -> TrainResult:
        config, env = self.config, self.env
        final = self.folder / FINAL
        start = self.load_checkpoint()
        result = TrainResult(final=final)
        if start >= config.iterations and final.exists():
            return result
        if env.main:
            _rewrite_metrics(self.folder / METRICS, start)
        local = config.batch_size // env.world
        log_sums: dict[str, float] = {}
        log_count, t_data, t_step = 0, 0.0, 0.0
        progress, task = self._progress(start)
        self.trainable.train()
        t_last = time.perf_counter()
        batches = iterate_batches(self.data, start, config.iterations, config.batch_size, env.rank, env.world,
                                  config.workers)
        run_start = time.perf_counter()
        for iteration, samples in batches:
            t0 = time.perf_counter()
            t_data += t0 - t_last
            with torch.autocast(env.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                losses = self.step_fn(self.wrapped, samples, iteration, env.rank * local)
            total = losses["total"]
            if not torch.isfinite(total):
                raise FloatingPointError(f"{self.name}: the loss is {total.item()} at iteration {iteration}")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, config.clip_gradient) \
                if config.clip_gradient > 0 else _grad_norm(self.params)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            t_last = time.perf_counter()
            t_step += t_last - t0
            for k, v in losses.items():
                if k == "total" or "_" not in k or not k[-1].isdigit():
                    log_sums[k] = log_sums.get(k, 0.0) + float(v.detach() if isinstance(v, Tensor) else v)
            log_sums["grad_norm"] = log_sums.get("grad_norm", 0.0) + float(grad_norm)
            log_count += 1
            done = iteration + 1
            if done % config.log_every == 0 or done == config.iterations:
                means = self._reduce({k: v / log_count for k, v in log_sums.items()})
                lr = config.lr * lr_factor(iteration, config.lr_steps, config.iterations, config.lr_gamma)
                record = {"iteration": done, "phase": self.name, "lr": lr, **means,
                          "data_seconds": t_data / log_count, "step_seconds": t_step / log_count}
                result.last_losses = means
                self._log(record)
                if progress is not None:
                    progress.update(task, completed=done, loss=means.get("total", float("nan")))
                log_sums, log_count, t_data, t_step = {}, 0, 0.0, 0.0
            if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.iterations:
                self.save_checkpoint(done)
            if self.evaluate and config.eval_every and done % config.eval_every == 0 and done < config.iterations:
                result.evaluations.append(self._evaluate(done))
            result.iterations_run += 1
            if progress is not None and done % config.log_every:
                progress.update(task, completed=done)
            if self.on_step is not None:
                self.on_step(self.name, done)
            if self._stop_requested(stop) and done < config.iterations:
                if progress is not None:
                    progress.stop()
                self.save_checkpoint(done)
                env.barrier()
                raise KeyboardInterrupt(f"{self.name}: stopped after iteration {done}; checkpoint saved, run the "
                                        "same command again to resume")
        if result.iterations_run:
            result.seconds_per_iteration = (time.perf_counter() - run_start) / result.iterations_run
        if progress is not None:
            progress.stop()
        self.trainable.eval()
        self.save_checkpoint(config.iterations)
        if self.evaluate:
            result.evaluations.append(self._evaluate(config.iterations))
        if env.main:
            extra = {"training": {**self.save_extra, "phase": self.name, "iterations": config.iterations,
                                  "config": config.to_json()}}
            self.model.float()  # model files are float32 (fp64 runs are checks)
            save_model(self.model, final, extra=extra)
        env.barrier()
        return result

    def _stop_requested(self, stop: _StopOnSignal) -> bool:
        """Whether any process was interrupted (all processes agree, so they stop at the same iteration)."""
        flag = torch.tensor([1.0 if stop.requested else 0.0], device=self.env.device)
        if self.env.world > 1:
            dist.all_reduce(flag)
        return bool(flag.item() > 0)

    def _reduce(self, values: dict[str, float]) -> dict[str, float]:
        if self.env.world == 1:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.env.device)
        dist.all_reduce(t)
        return {k: float(v) / self.env.world for k, v in zip(keys, t.tolist())}

    def _log(self, record: dict[str, Any]) -> None:
        if not self.env.main:
            return
        with open(self.folder / METRICS, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def _evaluate(self, iteration: int) -> dict[str, Any]:
        was = self.trainable.training
        self.trainable.eval()
        t0 = time.perf_counter()
        metrics = self.evaluate(iteration) if self.evaluate else {}
        self.trainable.train(was)
        record = {"iteration": iteration, "phase": self.name, "eval": metrics,
                  "eval_seconds": time.perf_counter() - t0}
        self._log(record)
        return record

    def _progress(self, start: int) -> tuple[Any, Any]:
        if not self.env.main or self.console is None:
            return None, None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(TextColumn(f"[bold]{self.name}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(), console=self.console,
                            transient=False)
        task = progress.add_task(self.name, total=self.config.iterations, completed=start, loss=float("nan"))
        progress.start()
        return progress, task


class _StopOnSignal:
    """While active, SIGINT / SIGTERM only set :attr:`requested`: the loop finishes the current step, saves a
    checkpoint and stops (a second SIGINT interrupts at once). Only in the main thread."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _grad_norm(params: list[nn.Parameter]) -> Tensor:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.zeros(())


def _write_config(config: TrainConfig, folder: Path, env: Runtime) -> None:
    if env.main:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / ".config.json.tmp"
        tmp.write_text(json.dumps(config.to_json(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, folder / "config.json")
    env.barrier()


def train(config: TrainConfig, console: Any = None,
          on_step: Callable[[str, int], None] | None = None) -> TrainResult:
    """Run a training stage as configured (see :mod:`.stages`); returns where the final model is.

    Args:
        config: the settings (:func:`~masqclip_cli.training.config.load_config`).
        console: a rich Console for the progress display (None: no display).
        on_step: called with ``(phase name, iterations done)`` after every step.

    Under ``torchrun`` every process calls this; the process group is created here (and destroyed at the end) unless
    the caller made it. SIGINT / SIGTERM stop after the current step with a checkpoint saved and raise
    KeyboardInterrupt; running the same command again resumes.
    """
    env = _setup(config)
    if config.batch_size % env.world:
        raise ConfigError(f"batch_size {config.batch_size} is not divisible by the {env.world} processes")

    def run_phase(phase: Phase) -> TrainResult:
        return _PhaseRunner(phase, config, env, console, on_step).run()

    try:
        recipe = stages.RECIPES[config.stage]
        _write_config(config, Path(config.out), env)
        return recipe(config, env, run_phase)
    finally:
        if env.owns_group and dist.is_initialized():
            dist.destroy_process_group()
