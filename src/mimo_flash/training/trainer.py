"""The trainer: one loop for pre-training and fine-tuning, on one process or many.
(Its settings: training/config.py.)

Per optimizer step, with B rows per micro-batch, A micro-batches and W ranks (G = B * A * W rows):
    loss = CE(main head) + mtp_weight * mean_k CE(MTP layer k)
each CE a mean over the step's whole batch (all micro-batches, all ranks) of the targets that lie in
the same document as the predicting position; gradients are accumulated over the A micro-batches,
clipped by global norm, then AdamW (betas 0.9 / 0.95; weight decay on matrices only, none on norms,
biases and sinks) steps under linear warm-up + cosine decay. After the step every MoE layer's
selection bias moves towards balance (aux-loss-free, DeepSeek-V3): bias += rate * sign(mean load - load).

Mixed precision: bf16 autocast on GPUs (master weights, optimizer and router in fp32), fp32 on CPUs.
Rows that are each one document from position 0 go to the model as a plain batch (no positions, no
segments: the same masks, and the plain-batch attention kernels). AdamW is training.optim.AdamW: on one GPU
one Triton kernel per large tensor and torch's fused kernel for the rest, the numbers of torch's fused AdamW.

No process holds the whole model: a model built on the meta device is sharded first (parallelize_for_training)
and each rank then fills only its shards (`init`: distributed.materialize's SeededInit or CheckpointInit).
With context parallelism (ctx.cp_mesh), the W / cp data-parallel groups each read their own rows and the cp
ranks of a group split every row (distributed.context_parallel: shard_batch, cp_head_sums); every rank's loss
is its own summed CEs over the step's global counts, so gradients summed over all ranks (FSDP's average times W)
are one process's. Checkpoints are training.dcp's: each rank writes its shards; they load on any layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn

from ..distributed.context import ParallelContext
from ..distributed.context_parallel import (ContextParallel, apply_context_parallel, check_seq_len, cp_head_sums,
                                            shard_batch)
from ..distributed.training import (clip_coefficient, clip_grad_norm, finish_gradients, parallelize_for_training,
                                    set_gradient_sync)
from ..model.loss import head_loss, target_counts
from ..model.moe import MoE
from . import dcp
from .config import TrainConfig
from .data import PackedRows, RowSampler
from .optim import AdamW, WarmupCosine, param_groups
from .sharded_export import export_sharded
from .tokens import TokenLoader, TokenRows


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """With enabled, torch's deterministic algorithms (warnings only where an op has none) inside the block;
    the process's own setting comes back on exit. Without, nothing changes."""
    if not enabled:
        yield
        return
    was, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn)


class TrainingDiverged(RuntimeError):
    """A step's loss or gradient norm was not finite (Trainer.fit stops before saving its weights)."""


class Trainer:
    """Train `model` on packed rows.

    model: MiMoForCausalLM, either built on the meta device (then `init` fills each rank's shards after
    sharding: distributed.materialize.SeededInit / CheckpointInit) or whole on the CPU (moved to ctx.device,
    then sharded when ctx is distributed). ctx: default one process on the GPU where there is one, else the CPU.
    rows: PackedRows (in memory, the same on every rank; each data-parallel rank takes its own rows of every
    step) or TokenRows (memory-mapped; a TokenLoader deals rows to the data-parallel ranks).
    """

    def __init__(self, model: nn.Module, rows: PackedRows | TokenRows, cfg: TrainConfig,
                 ctx: ParallelContext | None = None, tokenizer=None, init=None) -> None:
        cfg.validate()
        if len(rows) == 0:
            raise ValueError("no training rows: the packed data is empty")
        self.cfg, self.rows, self.tokenizer = cfg, rows, tokenizer
        self.ctx = ctx or ParallelContext()
        self.config = model.config
        dt = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if self.ctx.device.type == "cuda" else "float32")
        self.autocast_dtype = torch.bfloat16 if dt == "bfloat16" else None
        on_meta = any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))
        if on_meta and init is None:
            raise ValueError("the model is on the meta device: pass init= (distributed.materialize.SeededInit or "
                             "CheckpointInit) to fill its shards")
        self.model = (model if on_meta else model.to(self.ctx.device)).train()
        self.expert_params = parallelize_for_training(self.model, self.ctx, cfg.activation_checkpointing)
        if on_meta:
            init.fill(self.model, self.ctx.device)
        self.cp = None
        if self.ctx.cp_mesh is not None:
            check_seq_len(rows.seq_len, self.ctx.cp)
            self.cp = ContextParallel(self.ctx.cp_group)
            apply_context_parallel(self.model, self.cp)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # one GPU: fused (large tensors through the Triton kernel of training.optim, the rest torch's fused
        # kernel; on the mini preset 6 ms a step where torch's fused kernel took 8 and foreach 22); sharded: per tensor
        fused = self.ctx.device.type == "cuda" and not self.ctx.distributed
        self.optimizer = AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                               eps=cfg.eps, fused=fused or None, foreach=False if self.expert_params else None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, WarmupCosine(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
        if isinstance(rows, TokenRows):  # dealt to the data-parallel ranks (not to the CP ranks of a group)
            self.sampler = None
            self.loader = TokenLoader(rows, cfg.batch_size, rank=self.ctx.dp_rank, world=self.ctx.dp_world,
                                      seed=cfg.seed, shuffle=cfg.shuffle)
        else:
            self.sampler, self.loader = RowSampler(len(rows), seed=cfg.seed, shuffle=cfg.shuffle), None
        self.moes = [m for m in self.model.modules() if isinstance(m, MoE)]
        self.n_mtp = self.config.num_nextn_predict_layers if cfg.mtp else 0
        self.mtp_weight = cfg.mtp_weight if cfg.mtp_weight is not None else self.config.mtp_loss_weight
        E = self.config.n_routed_experts
        self.load_total = torch.zeros(len(self.moes), E, dtype=torch.float64)
        self.step = 0
        self.tokens_seen = 0
        self.history: list[dict] = []
        self._last_done = None  # CUDA: the end-of-step event of the last step whose metrics were read
        self.out = Path(cfg.out_dir) if cfg.out_dir else None
        # then the model gets no positions or segments
        self.plain_rows = self.loader is None and self.cp is None and rows.one_document_per_row()

    # ----------------------------------------------------------------- one step
    @property
    def rows_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.ctx.dp_world

    @property
    def epoch(self) -> float:
        """Epochs of data read so far."""
        if self.loader is not None:
            return self.loader.epoch + self.loader.position / max(1, self.loader.rows_per_epoch)
        return self.sampler.epoch

    def _next_batches(self) -> list[dict]:
        """This data-parallel rank's grad_accum micro-batches of the next step (dicts of [B, T] CPU tensors)."""
        B, A = self.cfg.batch_size, self.cfg.grad_accum
        if self.loader is not None:
            return [self.loader.next_batch() for _ in range(A)]
        rows = self.sampler.take(self.rows_per_step)
        d, W = self.ctx.dp_rank, self.ctx.dp_world
        return [self.rows.batch(rows[(m * W + d) * B:(m * W + d + 1) * B]) for m in range(A)]

    def _step_counts(self, batches: list[dict]) -> torch.Tensor:
        """The step's targets per head over all data-parallel ranks -> fp32 [1 + K] on the device (>= 1)."""
        n = sum(target_counts(b["labels"], 1 + self.n_mtp, b.get("segment_ids")).sum(0) for b in batches)
        counts = n.to(self.ctx.device, torch.float64)
        if self.ctx.distributed:
            self.ctx.all_reduce_(counts).div_(self.ctx.cp)  # the cp ranks of a group counted the same rows
        return counts.float().clamp_min(1)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.autocast_dtype)

    def _micro_step(self, batch: dict, denom) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward + backward of one micro-batch (gradients accumulate). denom: the step's target counts.
        Returns its summed CEs [1 + K] and expert loads [L, E] (or None)."""
        if self.cp is not None:  # this rank's shard of every row; its summed CEs over its own targets
            sharded = shard_batch(self.cp, batch["input_ids"], batch["labels"], batch.get("position_ids"),
                                  batch.get("segment_ids"), self.n_mtp)
            with self._autocast():
                parts = cp_head_sums(self.model, sharded)
        else:
            with self._autocast():
                out = self.model(batch["input_ids"], position_ids=batch.get("position_ids"),
                                 segment_ids=batch.get("segment_ids"), mtp=self.n_mtp > 0)
            # summed CE of each head (model.loss: the model's own targets); the backward writes each gradient
            # over its logits (nothing reads them again)
            heads = [out.logits] + out.mtp_logits[: self.n_mtp]
            del out
            parts = [head_loss(lg, batch["labels"], shift, batch.get("segment_ids"), reduction="sum", inplace=True)
                     .float() for shift, lg in enumerate(heads, start=1)]
            del heads
        # divided by the step's global counts: the gradients summed over ranks are the global mean's
        loss = parts[0] / denom[0]
        if self.n_mtp:
            mtp = sum(p / d for p, d in zip(parts[1:], denom[1:], strict=True))
            loss = loss + self.mtp_weight * mtp / self.n_mtp
        loss.backward()
        if not self.moes:
            return torch.stack([p.detach() for p in parts]), None
        none = torch.zeros(self.config.n_routed_experts, dtype=torch.long, device=self.ctx.device)
        loads = torch.stack([none if m.expert_load is None else m.expert_load for m in self.moes])
        return torch.stack([p.detach() for p in parts]), loads

    def _update(self) -> torch.Tensor:
        """Gradients (finished by compute_gradients) clipped, AdamW; returns the gradient norm (a tensor)."""
        if self.ctx.distributed or self.cfg.grad_clip <= 0:
            norm = clip_grad_norm(self.params, self.cfg.grad_clip, self.ctx)
            self.optimizer.step()
        else:  # one process: the clipping factor goes into the AdamW kernel (no pass over the gradients)
            norm = clip_grad_norm(self.params, 0.0, self.ctx)
            self.optimizer.step(clip_coef=clip_coefficient(norm, self.cfg.grad_clip))
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def train_step(self) -> dict:
        """One optimizer step; returns its metrics (global over ranks)."""
        return self._record(self._issue())

    def _issue(self) -> dict:
        """Queue one optimizer step on the device: micro-batches, update, balancing. Its metrics start on
        their way to the host (one copy, no wait); _record(what this returns) reads them. fit() issues the
        next step before reading a step's metrics, so the host never waits for the device between steps."""
        with deterministic_algorithms(self.cfg.deterministic):
            return self._issue_step()

    def compute_gradients(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Forward and backward of the next step's micro-batches (the data advances one step), gradients
        finished: each parameter's .grad (its shard) is then the gradient of the step's global loss, whatever
        the layout. -> (this rank's summed CEs per head [1 + K] float64, the step's global target counts
        [1 + K] fp32, this rank's expert loads [L, E] float64 or None)."""
        ctx, A = self.ctx, self.cfg.grad_accum
        batches = self._next_batches()
        denom = self._step_counts(batches)
        if self.plain_rows:  # a plain batch: the same masks, and the plain-batch attention kernels
            batches = [{k: b[k] for k in ("input_ids", "labels")} for b in batches]
        pin = ctx.device.type == "cuda"
        parts, step_loads = 0, None
        for m, b in enumerate(batches):
            set_gradient_sync(self.model, m == A - 1)
            p, lo = self._micro_step({k: (v.pin_memory() if pin else v).to(ctx.device, non_blocking=True)
                                      for k, v in b.items()}, denom)
            parts = parts + p.double()
            if lo is not None:
                step_loads = lo.double() if step_loads is None else step_loads + lo.double()
        finish_gradients(self.params, self.expert_params, ctx)
        return parts, denom, step_loads

    def _issue_step(self) -> dict:
        ctx = self.ctx
        t0 = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        parts, denom, step_loads = self.compute_gradients()
        norm = self._update()
        self.scheduler.step()
        loads = self._balance(step_loads)
        sums = ctx.all_reduce_(parts)
        self.step += 1
        tokens = self.rows_per_step * self.rows.seq_len
        self.tokens_seen += tokens
        # [sums (1 + K), counts (1 + K), grad norm, loads [L, E]] in one float64 vector, copied to the host
        # behind the step
        flat = torch.cat([sums, denom.double(), norm.double().reshape(1)]
                         + ([loads.reshape(-1)] if loads is not None else []))
        done = None
        if ctx.device.type == "cuda":
            host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            host.copy_(flat, non_blocking=True)
            done = torch.cuda.Event(enable_timing=True)
            done.record()
        else:
            host = flat
        return {"step": self.step, "lr": lr, "tokens": tokens, "tokens_seen": self.tokens_seen,
                "epoch": round(self.epoch, 4), "t0": t0, "t1": time.perf_counter(), "host": host,
                "done": done, "heads": len(denom)}

    def _record(self, issued: dict) -> dict:
        """The metrics of a step _issue() queued (waits for that step's numbers only)."""
        if issued["done"] is not None:
            issued["done"].synchronize()
        vals, n = issued["host"], issued["heads"]
        per = [float(s / d) for s, d in zip(vals[:n].tolist(), vals[n:2 * n].tolist(), strict=True)]
        # The step's own time. Not "time since the last record": fit() reads step n after issuing step n + 1,
        # so the last step's record came right after the one before it (0.6 ms for a 0.4 s step).
        if issued["done"] is None:  # CPU: the whole step ran inside _issue
            dt = issued["t1"] - issued["t0"]
        else:  # CUDA: from its issue to its end, or device time since the previous step ended when shorter
            dt = time.perf_counter() - issued["t0"]
            if self._last_done is not None:
                dt = min(dt, self._last_done.elapsed_time(issued["done"]) / 1e3)
            self._last_done = issued["done"]
        rec = {"step": issued["step"],
               "loss": per[0] + (self.mtp_weight * sum(per[1:]) / self.n_mtp if self.n_mtp else 0.0),
               "lm_loss": per[0]}
        if self.n_mtp:
            rec["mtp_loss"] = sum(per[1:]) / self.n_mtp
            rec["mtp_losses"] = per[1:]
        rec.update(lr=issued["lr"], grad_norm=float(vals[2 * n]), tokens=issued["tokens_seen"],
                   tokens_per_s=issued["tokens"] / dt, step_time=dt, epoch=issued["epoch"])
        if self.moes:
            loads = vals[2 * n + 1:].view(len(self.moes), -1)
            self.load_total += loads
            mean = loads.mean(dim=1)
            maxvio = (loads.max(dim=1).values - mean) / mean.clamp_min(1e-9)
            rec.update(load_maxvio=float(maxvio.mean()), load_maxvio_max=float(maxvio.max()))
        return rec

    @torch.no_grad()
    def _balance(self, loads: torch.Tensor | None) -> torch.Tensor | None:
        """Aux-loss-free balancing after the optimizer step. loads [L, E] token counts of this rank (None
        without MoE layers); returns them summed over ranks."""
        if not self.moes:
            return None
        self.ctx.all_reduce_(loads)
        if self.cfg.bias_update_rate > 0:
            mean = loads.mean(dim=1, keepdim=True)
            for moe, load, mu in zip(self.moes, loads, mean):
                bias = moe.gate.e_score_correction_bias
                bias += self.cfg.bias_update_rate * torch.sign(mu - load).to(bias.dtype)
        return loads

    # ---------------------------------------------------------------- the loop
    def fit(self) -> list[dict]:
        """Train to cfg.steps (resuming first when cfg.resume); checkpoint, log, plot. Returns the metrics.

        Each step is issued before the previous step's metrics are read, so the host prepares the next
        step while the device finishes the last one; checkpoints wait for their step's metrics."""
        from tqdm.auto import tqdm

        cfg, ctx = self.cfg, self.ctx
        if cfg.resume:
            self.resume()
        metrics = self.out / "metrics.jsonl" if self.out and ctx.is_main else None
        if metrics is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            _truncate_metrics(metrics, self.step)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and ctx.is_main),
                   dynamic_ncols=True, desc="train", unit="step")
        tps = None
        every = cfg.log_every if cfg.log_every is not None else max(1, cfg.steps // 10)

        def log(issued: dict) -> None:
            nonlocal tps
            rec = self._record(issued)
            self.history.append(rec)
            if not (math.isfinite(rec["loss"]) and math.isfinite(rec["grad_norm"])):
                bar.close()  # before any checkpoint of the weights this step's update has ruined
                raise TrainingDiverged(
                    f"step {rec['step']}: loss {rec['loss']}, gradient norm {rec['grad_norm']}; training stopped, "
                    f"nothing saved from this step on" + (f" (earlier checkpoints: {self.checkpoint_root})"
                                                         if self.out and cfg.save_every else ""))
            tps = rec["tokens_per_s"] if tps is None else 0.9 * tps + 0.1 * rec["tokens_per_s"]
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{tps:,.0f}", lr=f"{rec['lr']:.2e}", refresh=False)
            bar.update(1)
            if bar.disable and ctx.is_main and every and (rec["step"] % every == 0 or rec["step"] in (1, cfg.steps)):
                print(f"step {rec['step']}/{cfg.steps}  loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  "
                      f"{tps:,.0f} tokens/s  {rec['step_time']:.3f} s/step", flush=True)
            if metrics is not None:
                with open(metrics, "a") as f:
                    f.write(json.dumps(rec) + "\n")

        pending = None
        while self.step < cfg.steps:
            issued = self._issue()
            if pending is not None:
                log(pending)
            pending = issued
            if self.out and cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                log(pending)
                pending = None
                self.save()
        if pending is not None:
            log(pending)
        bar.close()
        if self.out:
            self.save()
            if cfg.plot and ctx.is_main:
                from .plot import plot_metrics

                self.plot_path = plot_metrics(metrics, self.out / "loss_curve.png")
        return self.history

    # --------------------------------------------------------------- checkpoints
    @property
    def checkpoint_root(self) -> Path:
        if self.out is None:
            raise ValueError("the trainer has no out_dir for checkpoints")
        return self.out / "checkpoints"

    def _meta(self) -> dict:
        data = self.loader.state_dict() if self.loader is not None else self.sampler.state_dict()
        return {"tokens_seen": self.tokens_seen, "data": data, "data_fingerprint": self.rows.fingerprint(),
                "seq_len": self.rows.seq_len, "world": self.ctx.world, "ep": self.ctx.ep, "cp": self.ctx.cp,
                "scheduler_epoch": self.scheduler.last_epoch, "train_config": dataclasses.asdict(self.cfg),
                "model_config": self.config.to_dict(), "load_total": self.load_total.tolist()}

    def _layout(self) -> dict:
        return {"world": self.ctx.world, "ep": self.ctx.ep, "cp": self.ctx.cp}

    def save(self) -> Path:
        """Write a training checkpoint of the current step (collective: every rank writes its own shards)."""
        rank_state = {"rng": dcp.rng_state(), **self._layout()}
        return dcp.save(self.checkpoint_root, self.step, self.model, self.optimizer, extra=self._meta(),
                        rank_state=rank_state, keep=self.cfg.keep_checkpoints)

    def resume(self, path: str | Path | None = None) -> bool:
        """Continue from the step directory `path` or the newest checkpoint under out_dir; False when there is
        none. The checkpoint may come from another number of ranks or another expert-parallel size (DCP
        reshards); with the same layout the run continues bit for bit."""
        if path is not None:
            path = Path(path)
            root, step = path.parent, int(path.name.removeprefix("step-"))
        else:
            root, step = self.checkpoint_root, dcp.latest(self.checkpoint_root)
        if step is None:
            if self.ctx.is_main:
                print(f"no checkpoint in {root}; starting at step 0")
            return False
        meta = json.loads((dcp.step_dir(root, step) / "extra.json").read_text())
        if meta.get("data_fingerprint") != self.rows.fingerprint():
            raise ValueError(f"{dcp.step_dir(root, step)}: the checkpoint was trained on other data (or another "
                             "tokenizer or seq_len); refusing to resume")
        saved = {k: meta.get(k) for k in self._layout()}
        if saved != self._layout() and self.ctx.is_main:
            print(f"note: resuming a run of layout {saved} on {self._layout()} (the same data order, the same "
                  "numbers up to the order of the sums)")
        dcp.load(root, self.model, self.optimizer, step=step)
        # the schedule of this run's settings wins (the same numbers when they did not change)
        sched = self.scheduler
        sched.last_epoch = meta["scheduler_epoch"]
        sched.lr_lambdas = [WarmupCosine(self.cfg.warmup_steps, self.cfg.steps, self.cfg.min_lr_ratio)
                            for _ in sched.lr_lambdas]
        sched.base_lrs = [self.cfg.lr for _ in sched.base_lrs]
        for group, base, f in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
            group["lr"] = base * f(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        self.step = meta["step"]
        self.tokens_seen = meta["tokens_seen"]
        (self.loader if self.loader is not None else self.sampler).load_state_dict(meta["data"])
        if meta.get("load_total") is not None:
            self.load_total = torch.tensor(meta["load_total"], dtype=torch.float64)
        mine = dcp.load_rank_state(root, step, self.ctx.rank)
        if mine is not None and {k: mine.get(k) for k in self._layout()} == self._layout():
            dcp.set_rng_state(mine["rng"])
        if self.ctx.is_main:
            print(f"resumed from {dcp.step_dir(root, step)} at step {self.step}")
        return True

    def export(self, path: str | Path, dtype: str | None = None, fp8: bool = False) -> Path:
        """Save the model in hub format (loadable by from_pretrained and transformers) with the tokenizer beside
        it, tensor by tensor from the shards (training.sharded_export; fp8: FP8 with 128 x 128 block scales).
        Collective: every rank calls, rank 0 writes."""
        path = Path(path)
        export_sharded(self.model, path, dtype=dtype or self.config.torch_dtype, fp8=fp8)
        if self.ctx.is_main and self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)
        self.ctx.barrier()
        return path

    # ------------------------------------------------------------------ summary
    def load_summary(self) -> str:
        """Per MoE layer: each expert's share of the routed tokens over this run, and the bias range."""
        if not self.moes or self.load_total.sum() == 0:
            return "no MoE layers" if not self.moes else "no tokens routed yet"
        E = self.load_total.shape[1]
        lines = [f"expert load over the run (% of routed tokens; balanced = {100 / E:.1f}%):"]
        names = {id(m): n for n, m in self.model.named_modules()}
        for moe, load in zip(self.moes, self.load_total):
            share = 100 * load / load.sum()
            bias = moe.gate.e_score_correction_bias.float()
            layer = names[id(moe)].split(".")[2]
            shares = (" ".join(f"{s:4.1f}" for s in share.tolist()) if E <= 16 else
                      f"min {float(share.min()):.2f} max {float(share.max()):.2f}")
            lines.append(f"  layer {layer:>2}: {shares}  | max/mean {float(share.max() * E / 100):.2f}"
                         f"  bias [{float(bias.min()):+.4f}, {float(bias.max()):+.4f}]")
        return "\n".join(lines)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics lines past `step` (written by a run that died after its last checkpoint)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))

