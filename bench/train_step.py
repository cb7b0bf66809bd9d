"""A whole training step of the mini preset, mimo-flash vs transformers eager (GPU).

Step = forward with labels (next-token cross entropy) + backward + AdamW update + zero_grad, bf16 weights,
B x T random tokens. AdamW: torch's fused kernel for transformers; mimo-flash's own (training.optim.AdamW, the
same numbers; --torch-adamw adds a row of ours with torch's). transformers' MiMoV2FlashForCausalLM gets the
same weights (its MTP-less twin; MTP is off on our side too, and shown separately with --mtp).
Ours runs with return_logits=False (the loss's backward reuses the logits buffer; ops/loss.py).
--graph adds a row where the whole step (forward, backward, our AdamW, capturable) is one CUDA graph
replayed per step (same math, no launch gaps); it falls back to a note if capture fails.
--trainer adds the Trainer's own step on the same rows: bf16 weights (dtype bfloat16), no MTP, no clipping
and no balancing, as the step above; it also measures the gradient norm, samples and copies its rows and
reads its metrics back every step (its back-to-back time is its fit() loop). --packed gives the Trainer the
same tokens as documents of random lengths packed with segments (the masked attention paths that real data
takes), and its first step's time (compilation) is printed; with --mtp its MTP loss is on. A stuck run prints
every thread's stack on SIGUSR1 (`timeout -s USR1 -k 20 300 python bench/train_step.py ...`).
Each row has two times: "ms/step", the median of steps each synchronised and timed on its own (the host
issues every step from an idle GPU), and "back to back", the mean over twice as many steps issued one after
the other with no synchronisation between them, as a training loop runs (the host issues a step while the
GPU finishes the one before). Speed-ups compare like with like.

    python bench/train_step.py [--batch 4] [--seq 4096] [--mtp] [--graph] [--trainer] [--no-transformers]
"""

from __future__ import annotations

import argparse
import faulthandler
import signal
import time

import torch

from common import (fmt, hardware_limits, header, model_flops, oom_safe, table, time_ms, time_ms_back_to_back,
                    transformers_config, transformers_state)

from mimo_flash import MiMoConfig, MiMoForCausalLM


def build_ours(config: MiMoConfig) -> MiMoForCausalLM:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = MiMoForCausalLM(config)
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("attention_sink_bias"):
                p.normal_(0.0, 1.0)
    return model.train()


def build_transformers(config: MiMoConfig, state: dict[str, torch.Tensor]):
    from transformers import MiMoV2FlashForCausalLM
    tc = transformers_config(config)
    with torch.device("cuda"):
        model = MiMoV2FlashForCausalLM(tc)
    model = model.to(torch.bfloat16)
    missing, unexpected = model.load_state_dict(transformers_state(state, config), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return model.train(), tc


def adamw(model, ours: bool, **kw):
    """Ours: mimo-flash's AdamW (training.optim: a Triton kernel per large tensor, the numbers of torch's fused
    AdamW); else torch's fused AdamW."""
    from mimo_flash.training.optim import AdamW
    cls = AdamW if ours else torch.optim.AdamW
    return cls(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=True, **kw)


def measure(model, ids, forward, iters, ours: bool = True):
    opt = adamw(model, ours)
    losses = []

    def step():
        loss = forward(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    torch.cuda.reset_peak_memory_stats()
    ms = time_ms(step, warmup=2, iters=iters)
    mem = torch.cuda.max_memory_allocated() / 2 ** 30
    back = time_ms_back_to_back(step, warmup=0, iters=2 * iters)
    if measure_graphed.gaps and ours and not hasattr(measure, "gap_note"):  # the first (default) row only
        measure.gap_note = gap_report(step, "eager")
    del opt
    measure.losses = [x.item() for x in losses[:4]]
    return ms, back, mem, losses[0].item()


def measure_graphed(model, ids, forward, iters):
    """The whole step captured once as a CUDA graph (PyTorch's whole-network capture recipe) and replayed."""
    opt = adamw(model, True, capturable=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    losses = []
    with torch.cuda.stream(s):  # warm-up (compiles, autotunes) outside the capture
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            loss = forward(model, ids)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = forward(model, ids)
        static_loss.backward()
        opt.step()
    for _ in range(2):  # steps 3 and 4
        graph.replay()
        losses.append(static_loss.item())
    measure_graphed.losses = losses
    torch.cuda.reset_peak_memory_stats()
    ms = time_ms(graph.replay, warmup=2, iters=iters)
    mem = torch.cuda.max_memory_allocated() / 2 ** 30
    back = time_ms_back_to_back(graph.replay, warmup=0, iters=2 * iters)
    # where the step goes: forward + backward alone as a graph, and the optimizer step alone
    measure_graphed.split = None
    try:
        fb_graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)  # fresh gradients, as in the step (else the backward adds into them)
        with torch.cuda.graph(fb_graph):
            forward(model, ids).backward()
        measure_graphed.split = (time_ms(fb_graph.replay, warmup=2, iters=iters),
                                 time_ms(opt.step, warmup=2, iters=iters))
        if measure_graphed.gaps:
            measure_graphed.gap_note = gap_report(graph.replay, "graph")
        del fb_graph
    except Exception as e:  # noqa: BLE001
        print(f"forward + backward graph failed: {type(e).__name__}: {e}"[:300])
    del opt, graph
    return ms, back, mem, losses[0]


def gap_report(replay, name: str = "train_step") -> str:
    """Profile one replay of a CUDA graph (the whole step): the GPU's time by kernel, its busy time (kernels,
    copies, memsets) and its idle time between them, summed by the pair of kernels around it, and the largest
    single gaps -> $OUT/gaps_<name>.txt; returns a one-line summary. replay: any function (one step)."""
    import os
    from collections import Counter
    from pathlib import Path
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        replay()
        torch.cuda.synchronize()
    ev = sorted(((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                 if e.device_type == DeviceType.CUDA), key=lambda t: t[0])
    busy = sum(b - a for a, b, _ in ev)
    span = ev[-1][1] - ev[0][0]
    by_pair, sizes = Counter(), Counter()
    for (a0, b0, n0), (a1, b1, n1) in zip(ev, ev[1:]):
        gap = max(0.0, a1 - b0)
        by_pair[(n0[:60], n1[:60])] += gap
        size = "<1us" if gap < 1 else "1-2us" if gap < 2 else "2-5us" if gap < 5 else "5-20us" if gap < 20 else ">20us"
        sizes[size] += gap
    lines = [f"{len(ev)} GPU events, span {span / 1e3:.2f} ms, busy {busy / 1e3:.2f} ms, "
             f"idle {(span - busy) / 1e3:.2f} ms",
             "idle by gap size (ms): " + ", ".join(f"{k} {v / 1e3:.2f}" for k, v in sorted(sizes.items())), ""]
    lines += [f"{v / 1e3:8.3f} ms  {a}  ->  {b}" for (a, b), v in by_pair.most_common(40)]
    by_name, calls = Counter(), Counter()
    for a, b, n in ev:
        by_name[n[:110]] += b - a
        calls[n[:110]] += 1
    lines += ["", "GPU time by kernel (ms, calls):"]
    lines += [f"{v / 1e3:8.3f} ms {calls[n]:4d}  {n}" for n, v in by_name.most_common(70)]
    big = sorted(((ev[i + 1][0] - ev[i][1], i) for i in range(len(ev) - 1)), reverse=True)[:5]
    for gap, i in big:  # the largest single gaps, with the events around them
        lines += ["", f"gap of {gap:.1f} us after event {i} of {len(ev)}:"]
        lines += [f"    {ev[j][2][:100]}  ({ev[j][1] - ev[j][0]:.1f} us)"
                  for j in range(max(0, i - 3), min(len(ev), i + 4))]
    Path(os.environ.get("OUT", "."), f"gaps_{name}.txt").write_text("\n".join(lines) + "\n")
    return f"{name}, one step profiled: " + lines[0] + "; " + lines[1]


def packed_rows(ids: torch.Tensor):
    """The tokens of ids cut into documents of random lengths (8 .. T), packed as pack_documents packs them:
    positions restart at each document, one segment per document (the model masks attention by segment)."""
    from mimo_flash.training.data import Document, pack_documents
    B, T = ids.shape
    flat, g = ids.cpu().reshape(-1).tolist(), torch.Generator().manual_seed(0)
    docs, i = [], 0
    while i < len(flat):
        n = int(torch.randint(8, T + 1, (1,), generator=g))
        docs.append(Document(flat[i:i + n]))
        i += n
    return pack_documents(docs, T)


def measure_trainer(config: MiMoConfig, state: dict, ids: torch.Tensor, iters: int, packed: bool = False,
                    mtp: bool = False):
    """The Trainer's train_step on the rows of ids (one document each; packed: documents of random lengths, see
    packed_rows), from the same weights; then its fit() loop (which issues each step before it reads the last
    one's metrics): 2 steps to warm up, then 2 * iters timed. The first step's time (compilation included) is
    kept in measure_trainer.first_s."""
    from mimo_flash.training import TrainConfig, Trainer
    from mimo_flash.training.data import PackedRows
    from mimo_flash.distributed import ParallelContext
    model = build_ours(config)
    model.load_state_dict(state)
    B, T = ids.shape
    x = ids.cpu()
    rows = packed_rows(ids) if packed else \
        PackedRows(x, x.clone(), torch.arange(T).expand(B, T).clone(), torch.zeros(B, T, dtype=torch.long))
    cfg = TrainConfig(steps=1000, batch_size=B, lr=1e-5, warmup_steps=0, min_lr_ratio=1.0, grad_clip=0.0, mtp=mtp,
                      bias_update_rate=0.0, dtype="bfloat16", shuffle=False, progress=False, plot=False)
    trainer = Trainer(model, rows, cfg, ParallelContext(device=torch.device("cuda")))
    recs = []
    t0 = time.perf_counter()
    recs.append(trainer.train_step())
    torch.cuda.synchronize()
    measure_trainer.first_s = time.perf_counter() - t0
    print(f"Trainer: first step {measure_trainer.first_s:.1f} s (packed={packed}, mtp={mtp})", flush=True)
    torch.cuda.reset_peak_memory_stats()
    ms = time_ms(lambda: recs.append(trainer.train_step()), warmup=2, iters=iters)
    mem = torch.cuda.max_memory_allocated() / 2 ** 30
    trainer.cfg.steps = trainer.step + 2
    trainer.fit()  # warm-up (its first call imports tqdm)
    trainer.cfg.steps = trainer.step + 2 * iters
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    trainer.fit()  # ends with its last step's metrics on the host
    back = (time.perf_counter() - t0) / (2 * iters) * 1e3
    measure_trainer.fit_steps = [round(r["step_time"] * 1e3, 1) for r in trainer.history[-2 * iters:]]
    measure_trainer.gap_note = None
    if measure_graphed.gaps:
        measure_trainer.gap_note = gap_report(trainer.train_step, "trainer")
        host_profile(trainer, iters)
    measure_trainer.losses = [r["loss"] for r in recs[:4]]
    del trainer, model
    torch.cuda.empty_cache()
    return ms, back, mem, recs[0]["loss"]


def host_profile(trainer, iters: int) -> None:
    """cProfile of the Trainer's fit() over 2 * iters steps -> $OUT/trainer_host.txt (by own time, then by
    cumulative time): where the host's time goes while it feeds the GPU."""
    import cProfile
    import io
    import os
    import pstats
    from pathlib import Path
    trainer.cfg.steps = trainer.step + 2 * iters
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    trainer.fit()
    prof.disable()
    buf = io.StringIO()
    for key in ("tottime", "cumulative"):
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(35)
    Path(os.environ.get("OUT", "."), "trainer_host.txt").write_text(buf.getvalue())


def profile_step(model, ids) -> None:
    """Time tables of one forward + backward (no optimizer) -> $OUT/profile_train_step.txt: by kernel and
    operator (self GPU time), then by operator and input shapes."""
    import os
    from pathlib import Path
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        model(ids, labels=ids, return_logits=False).loss.backward()
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    kw = dict(sort_by="self_cuda_time_total", max_name_column_width=110)
    text = (prof.key_averages().table(row_limit=80, **kw) + "\n\n"
            + prof.key_averages(group_by_input_shape=True).table(row_limit=60, max_shapes_column_width=90, **kw))
    Path(os.environ.get("OUT", "."), "profile_train_step.txt").write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--mtp", action="store_true", help="also time ours with the 3 MTP layers and their loss")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--graph", action="store_true", help="also time ours with the whole step as one CUDA graph")
    ap.add_argument("--trainer", action="store_true", help="also time the Trainer's own step")
    ap.add_argument("--packed", action="store_true",
                    help="the Trainer's rows are documents of random lengths packed with segments (with --trainer)")
    ap.add_argument("--torch-adamw", action="store_true", help="also time ours with torch's fused AdamW")
    ap.add_argument("--unfused-loss", action="store_true", help="also time ours with return_logits=True")
    ap.add_argument("--profile", action="store_true", help="write a kernel profile of one of our steps to $OUT")
    ap.add_argument("--gaps", action="store_true", help="GPU time by kernel and idle time of one eager step, "
                    "of the whole-step graph (with --graph) and of the Trainer (with --trainer): $OUT/gaps_*.txt; "
                    "with --trainer also a cProfile of its fit(): $OUT/trainer_host.txt")
    args = ap.parse_args()
    measure_graphed.gaps, measure_graphed.gap_note = args.gaps, None
    config = MiMoConfig.preset("mini")
    peak_tflops, peak_tbps = hardware_limits()
    B, T = args.batch, args.seq
    ids = torch.randint(0, config.vocab_size, (B, T), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    flops = model_flops(config, B, T, train=True)
    rows, notes = {}, []

    ours = build_ours(config)
    state = {k: v.detach().clone() for k, v in ours.state_dict().items()}  # the weights before any step
    ours_fwd = lambda m, x: m(x, labels=x, return_logits=False).loss  # noqa: E731
    try:
        rows["mimo-flash"] = measure(ours, ids, ours_fwd, args.iters)
    except Exception as e:  # noqa: BLE001  the new loss kernels failed: report and fall back
        import mimo_flash.ops.loss as loss_mod
        loss_mod.TRITON = False
        ours.zero_grad(set_to_none=True)
        notes.append(f"Triton cross-entropy failed ({type(e).__name__}: {str(e)[:200]}); timed the chunked "
                     "PyTorch loss instead")
        rows["mimo-flash"] = measure(ours, ids, ours_fwd, args.iters)
    eager_losses = measure.losses
    if getattr(measure, "gap_note", None):
        notes.append(measure.gap_note)
    if args.torch_adamw:
        rows["mimo-flash with torch's fused AdamW"] = measure(ours, ids, ours_fwd, args.iters, ours=False)
    if args.unfused_loss:
        rows["mimo-flash, return_logits=True"] = measure(ours, ids, lambda m, x: m(x, labels=x).loss, args.iters)
    if args.profile:
        profile_step(ours, ids)
    if args.mtp:
        rows["mimo-flash + 3 MTP"] = oom_safe(lambda: measure(
            ours, ids, lambda m, x: m(x, labels=x, mtp=True, return_logits=False).loss, args.iters))
    del ours
    torch.cuda.empty_cache()
    if not args.no_transformers:
        tf, tc = build_transformers(config, state)
        rows["transformers"] = oom_safe(lambda: measure(tf, ids, lambda m, x: m(input_ids=x, labels=x).loss,
                                                        max(2, args.iters // 2), ours=False))
        notes.append(f"transformers: attention {tc._attn_implementation}, experts "
                     f"{getattr(tc, '_experts_implementation', '?')}")
        del tf
        torch.cuda.empty_cache()
    if args.trainer:
        try:
            rows["mimo-flash Trainer.train_step"] = measure_trainer(config, state, ids, args.iters, args.packed,
                                                                    args.mtp)
            notes.append(f"Trainer ({'packed documents' if args.packed else 'one document a row'}, MTP "
                         f"{'on' if args.mtp else 'off'}): first step {measure_trainer.first_s:.1f} s; "
                         "losses of steps 1-4 " + ", ".join(f"{x:.5f}" for x in measure_trainer.losses)
                         + "; fit()'s own step times (ms): " + ", ".join(map(str, measure_trainer.fit_steps)))
            if measure_trainer.gap_note:
                notes.append(measure_trainer.gap_note)
        except Exception as e:  # noqa: BLE001
            notes.append(f"Trainer failed: {type(e).__name__}: {str(e)[:300]}")
    if args.graph:  # last: a failed capture must not spoil the other rows
        ours = build_ours(config)
        ours.load_state_dict(state)
        try:
            rows["mimo-flash, step as one CUDA graph"] = measure_graphed(ours, ids, ours_fwd, args.iters)
            notes.append("losses of steps 1-4, eager: " + ", ".join(f"{x:.5f}" for x in eager_losses)
                         + "; graphed: " + ", ".join(f"{x:.5f}" for x in measure_graphed.losses))
            if measure_graphed.split:
                fb, adamw = measure_graphed.split
                notes.append(f"graphed step split: forward + backward as a graph {fb:.1f} ms, fused AdamW step "
                             f"{adamw:.1f} ms")
            if measure_graphed.gap_note:
                notes.append(measure_graphed.gap_note)
        except Exception as e:  # noqa: BLE001
            notes.append(f"CUDA-graph step failed: {type(e).__name__}: {str(e)[:300]}")
        del ours
    del state
    tf_row = rows.get("transformers")
    out = []
    for name, r in rows.items():
        if r is None:
            out.append([name, "OOM", "", "", "", "", "", "", ""])
            continue
        ms, back, mem, loss = r
        f = flops if "MTP" not in name else None
        out.append([name, fmt(ms, ".1f"), fmt(back, ".1f"), fmt(B * T / back * 1e3, ",.0f"),
                    fmt(f / back / 1e9 if f else None, ".0f"), fmt(mem, ".1f"), f"{loss:.4f}",
                    fmt(tf_row[0] / ms, ".2f") if tf_row else "n/a", fmt(tf_row[1] / back, ".2f") if tf_row else "n/a"])
    notes.insert(0, f"measured ceilings this run: bf16 matmul {peak_tflops:.0f} TFLOP/s, copy {peak_tbps:.2f} TB/s; "
                    f"target >= 8x transformers eager")
    notes.append(f"{flops / 1e12:.1f} TFLOP per step (model_flops in bench/common.py: 3x forward matmuls, "
                 "3.5x attention core; optimizer and elementwise work not counted)")
    table(f"Training step, mini preset, {B}x{T} tokens", header(),
          ["impl", "ms/step", "ms/step back to back", "tokens/s back to back", "TFLOP/s", "peak GiB", "first loss",
           "speed-up", "speed-up back to back"], out, notes)


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    main()
