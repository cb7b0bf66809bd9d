"""The trainer: optimizer set-up, schedule, loss, gradient accumulation, aux-loss-free balancing,
activation checkpointing, logs and plot, hub-format export, and the `train` command."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mimo_flash import MiMoConfig, MiMoForCausalLM
from mimo_flash.cli import main
from mimo_flash.training import Document, TrainConfig, Trainer, TrainingDiverged, pack_documents
from mimo_flash.training.demo import CHAT_TEMPLATE, train_tokenizer
from mimo_flash.distributed import ParallelContext
from mimo_flash.training.optim import WarmupCosine, param_groups

from conftest import run_in_triton_interpreter
from loss_reference import document_loss_sums

TEXT = ("The for statement is used to iterate over the elements of a sequence (such as a string, tuple or "
        "list) or other iterable object. The while statement is used for repeated execution as long as an "
        "expression is true. ")


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return MiMoForCausalLM(MiMoConfig.preset("tiny", **kw))


def rows(n_docs=12, T=48, seed=0, vocab=200):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 70, (n_docs,), generator=g).tolist()
    return pack_documents([Document(torch.randint(3, vocab, (n,), generator=g).tolist()) for n in lengths], T)


def quiet(**kw):
    base = dict(steps=4, batch_size=2, warmup_steps=1, lr=2e-3, progress=False, plot=False)
    return TrainConfig(**{**base, **kw})


def test_param_groups_no_decay_on_vectors():
    model = tiny()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert any(n.endswith("attention_sink_bias") for n in nd)
    assert any(n.endswith("layernorm.weight") for n in nd) and "model.norm.weight" in nd
    assert all(not n.endswith(("norm.weight", "sink_bias")) for n in d)
    assert {"lm_head.weight", "model.embed_tokens.weight", "model.layers.1.mlp.experts.gate_up_proj"} <= d
    assert len(nd) + len(d) == len(list(model.parameters()))
    # the balancing bias is a buffer, never trained by the optimizer
    assert not any("e_score_correction_bias" in n for n in nd | d)


def test_warmup_cosine():
    f = WarmupCosine(warmup=10, total=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)


def test_one_step_matches_hand_computed_loss_and_adamw():
    """Step 1's logged losses are the token-weighted means of the documents' own losses (CE + 0.3 * mean MTP
    CE); its gradients are those of the model's own loss; the update is torch's AdamW."""
    data = rows(n_docs=4, T=64)
    model = tiny()
    ref = tiny()
    batch = data.batch(torch.arange(len(data)))
    tr = Trainer(model, data, quiet(batch_size=len(data), shuffle=False, grad_clip=0.0, lr=1e-3, warmup_steps=0,
                                    steps=1))
    grads = _capture_grads(tr)
    rec = tr.train_step()
    # the expected losses: every document of every row run alone, its targets the slices of its own tokens
    sums, n = [0.0] * 4, [0] * 4
    for r in range(len(data)):
        s, c = document_loss_sums(ref, batch["input_ids"][r], batch["segment_ids"][r], batch["labels"][r], 3)
        sums = [a + x for a, x in zip(sums, s, strict=True)]
        n = [a + x for a, x in zip(n, c, strict=True)]
    want = sums[0] / n[0] + 0.3 * sum(s / c for s, c in zip(sums[1:], n[1:], strict=True)) / 3
    assert rec["loss"] == pytest.approx(want, rel=1e-5)
    assert rec["lm_loss"] == pytest.approx(sums[0] / n[0], rel=1e-5)
    assert rec["mtp_losses"] == pytest.approx([s / c for s, c in zip(sums[1:], n[1:], strict=True)], rel=1e-5)
    # the update: torch's AdamW on the gradient of the model's own loss of the whole packed batch
    out = ref(batch["input_ids"], position_ids=batch["position_ids"], segment_ids=batch["segment_ids"],
              labels=batch["labels"], mtp=True)
    assert out.loss.item() == pytest.approx(want, rel=1e-5)
    out.loss.backward()
    for (name, p), g in zip(ref.named_parameters(), grads[0], strict=True):
        torch.testing.assert_close(g, p.grad, atol=1e-7, rtol=1e-5, msg=name)
        p.grad = g  # AdamW's first step amplifies rounding in near-zero gradients: step on the trainer's own
    opt = torch.optim.AdamW(param_groups(ref, 0.1), lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    opt.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)


def _capture_grads(trainer):
    """Record the gradients the optimizer sees at every step."""
    seen = []
    trainer.optimizer.register_step_pre_hook(lambda *_: seen.append([p.grad.clone() for p in trainer.params]))
    return seen


def test_grad_accumulation_equals_big_batch():
    data = rows()
    ta = Trainer(tiny(), data, quiet(batch_size=4, grad_accum=1))
    tb = Trainer(tiny(), data, quiet(batch_size=2, grad_accum=2))
    ga, gb = _capture_grads(ta), _capture_grads(tb)
    ha, hb = ta.fit(), tb.fit()
    for ra, rb in zip(ha, hb, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)
    for x, y in zip(ga[0], gb[0], strict=True):  # the first step's gradients (later ones differ by Adam's amplification)
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-4)


def test_fit_issuing_ahead_equals_step_by_step():
    """fit() issues step n + 1 before it reads step n's metrics: the same records (losses, norms, loads,
    LRs), the same weights, biases and load totals as calling train_step() one step at a time."""
    data = rows()
    cfg = dict(steps=5, bias_update_rate=0.01, grad_clip=0.5)
    ta, tb = Trainer(tiny(), data, quiet(**cfg)), Trainer(tiny(), data, quiet(**cfg))
    ha = ta.fit()
    hb = [tb.train_step() for _ in range(5)]
    assert [r["step"] for r in ha] == [1, 2, 3, 4, 5]
    keys = ("loss", "lm_loss", "mtp_loss", "grad_norm", "lr", "tokens", "load_maxvio", "load_maxvio_max")
    for ra, rb in zip(ha, hb, strict=True):
        assert {k: ra[k] for k in keys} == {k: rb[k] for k in keys}
        assert ra["step_time"] > 0 and ra["tokens_per_s"] > 0
    for (name, p), q in zip(ta.model.named_parameters(), tb.model.parameters(), strict=True):
        assert torch.equal(p, q), name
    for ma, mb in zip(ta.moes, tb.moes, strict=True):
        assert torch.equal(ma.gate.e_score_correction_bias, mb.gate.e_score_correction_bias)
    assert torch.equal(ta.load_total, tb.load_total) and ta.load_total.sum() == 5 * 2 * 48 * 2 * len(ta.moes)  # steps x rows x T x top-2


@pytest.mark.gpu
def test_fit_issuing_ahead_on_cuda():
    """On CUDA the metrics come back through pinned memory behind each step: fit() (step n + 1 issued before
    step n's metrics are read) gives the records and weights of train_step() one step at a time."""
    data = rows()
    cfg = dict(steps=4, bias_update_rate=0.01, grad_clip=0.5, dtype="float32")
    ctx = ParallelContext(device=torch.device("cuda"))
    ta, tb = Trainer(tiny(), data, quiet(**cfg), ctx), Trainer(tiny(), data, quiet(**cfg), ctx)
    ha = ta.fit()
    hb = [tb.train_step() for _ in range(4)]
    keys = ("loss", "grad_norm", "lr", "load_maxvio")
    for ra, rb in zip(ha, hb, strict=True):
        assert {k: ra[k] for k in keys} == pytest.approx({k: rb[k] for k in keys}, rel=1e-5)
    assert torch.equal(ta.load_total, tb.load_total) and ta.load_total.sum() > 0
    for (name, p), q in zip(ta.model.named_parameters(), tb.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.gpu
def test_trainer_without_a_context_trains_on_the_gpu():
    """A Trainer given no ParallelContext takes the GPU where there is one (as `mimo-flash train` does): bench/spec.py
    built one so on the H200 and trained the mini preset on the CPU (one step in 231 s)."""
    tr = Trainer(tiny(), rows(), quiet(steps=1))
    assert tr.ctx.device.type == "cuda" and all(p.is_cuda for p in tr.model.parameters())
    tr.train_step()


def test_balancing_moves_biases_by_sign_of_load():
    data = rows()
    model = tiny()
    tr = Trainer(model, data, quiet(steps=1, bias_update_rate=0.01))
    before = [m.gate.e_score_correction_bias.clone() for m in tr.moes]
    loads = []
    orig = tr._balance

    def spy(load):
        loads.append(load.clone())
        return orig(load)

    tr._balance = spy
    rec = tr.train_step()
    (load,) = loads
    assert load.sum(1).tolist() == [float(2 * 48 * 2)] * len(tr.moes)  # tokens x top-2 per layer
    for m, b0, ld in zip(tr.moes, before, load, strict=True):
        delta = m.gate.e_score_correction_bias - b0
        expect = 0.01 * torch.sign(ld.mean() - ld)
        torch.testing.assert_close(delta, expect.float())
        assert m.gate.e_score_correction_bias.dtype == torch.float32
    assert rec["load_maxvio"] > 0 and "expert load" in tr.load_summary()
    # rate 0 (the fine-tuning default) leaves them frozen
    tr0 = Trainer(tiny(), data, quiet(steps=2))
    b0 = [m.gate.e_score_correction_bias.clone() for m in tr0.moes]
    tr0.fit()
    assert all(torch.equal(m.gate.e_score_correction_bias, b) for m, b in zip(tr0.moes, b0, strict=True))


def test_balancing_evens_out_the_load():
    """Start with every token routed to experts 0 and 1 (a skewed bias); with the weights frozen, the
    bias updates alone bring the load back towards uniform."""
    data = rows(n_docs=16)
    model = tiny(seed=2)
    for n, b in model.named_buffers():
        if n.endswith("e_score_correction_bias"):
            b[:2] = 0.3
    tr = Trainer(model, data, quiet(steps=50, lr=1e-12, warmup_steps=0, bias_update_rate=0.01))
    hist = tr.fit()
    assert hist[0]["load_maxvio"] == pytest.approx(3.0)  # 2 of 8 experts take everything: 4x the mean
    late = sum(r["load_maxvio"] for r in hist[-10:]) / 10
    assert late < 1.0


def test_activation_checkpointing_same_result(tmp_path):
    data = rows()
    a, b = tiny(), tiny()
    ha = Trainer(a, data, quiet()).fit()
    tb = Trainer(b, data, quiet(activation_checkpointing=True, out_dir=str(tmp_path)))
    wrapped = type(tb.model.model.layers[0]).__name__
    assert wrapped == "CheckpointWrapper" and type(tb.model.model.mtp.layers[0]).__name__ == "CheckpointWrapper"
    hb = tb.fit()
    # its checkpoint keys the optimizer state by the layers' own names: a run without it resumes from it
    tc = Trainer(tiny(), data, quiet(steps=5, out_dir=str(tmp_path)))
    assert tc.resume() and tc.step == 4 and len(tc.optimizer.state) == len(tc.params)
    assert [r["loss"] for r in ha] == pytest.approx([r["loss"] for r in hb], rel=1e-6)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_loss_falls_and_logs(tmp_path):
    # a small, repetitive corpus: the loss must fall well below the uniform-guess level
    g = torch.Generator().manual_seed(0)
    base = torch.randint(3, 60, (40,), generator=g).tolist()
    data = pack_documents([Document(base) for _ in range(24)], 64)
    tr = Trainer(tiny(), data, quiet(steps=40, batch_size=4, lr=1e-2, warmup_steps=4, out_dir=str(tmp_path),
                                     plot=True, bias_update_rate=1e-3))
    hist = tr.fit()
    assert hist[0]["loss"] > 0.9 * math.log(512) * 1.3  # CE + 0.3 CE at about ln(V)
    assert hist[-1]["lm_loss"] < 0.3 * hist[0]["lm_loss"]
    assert hist[-1]["mtp_loss"] < 0.5 * hist[0]["mtp_loss"]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 41))
    assert {"loss", "lm_loss", "mtp_losses", "lr", "grad_norm", "tokens_per_s", "load_maxvio"} <= set(lines[0])
    png = tmp_path / "loss_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_loads_in_mimo_flash_and_transformers(tmp_path):
    data = rows()
    tok = train_tokenizer([TEXT * 5], 300, tmp_path / "tok")
    tr = Trainer(tiny(), data, quiet(steps=2, bias_update_rate=0.01), tokenizer=tok)
    tr.fit()
    path = tr.export(tmp_path / "final")
    assert (path / "tokenizer.json").exists() and (path / "tokenizer_config.json").exists()
    model = tr.model.eval()
    again = MiMoForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        a = model(ids, mtp=True)
        b = again(ids, mtp=True)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.mtp_logits[2], b.mtp_logits[2])
    for m, n in zip(tr.moes, [x for x in again.modules() if type(x).__name__ == "MoE"], strict=True):
        assert torch.equal(m.gate.e_score_correction_bias, n.gate.e_score_correction_bias)
    transformers = pytest.importorskip("transformers")
    tf = transformers.MiMoV2FlashForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(tf(ids).logits, a.logits, atol=1e-4, rtol=1e-4)


def _write_data(tmp_path):
    (tmp_path / "corpus.txt").write_text(TEXT * 6)
    chats = [{"messages": [{"role": "user", "content": f"What does statement {i} do?"},
                           {"role": "assistant", "content": "It is used to iterate over a sequence."}]}
             for i in range(6)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))


def test_train_command_pretrain_then_finetune(tmp_path, capsys):
    _write_data(tmp_path)
    tok = train_tokenizer([TEXT * 5], 300, tmp_path / "tok")
    assert tok.chat_template == CHAT_TEMPLATE
    run = tmp_path / "run"
    rc = main(["train", "--preset", "tiny", "--tokenizer", str(tmp_path / "tok"), "--data", str(tmp_path / "corpus.txt"),
               "--out", str(run), "--steps", "3", "--seq-len", "32", "--batch-size", "2", "--lr", "1e-3",
               "--no-progress", "--set", "num_hidden_layers=3"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "loss" in out and "expert load" in out and "final model" in out
    cfg = json.loads((run / "final" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3
    assert (run / "loss_curve.png").exists() and (run / "checkpoints").is_dir()

    ft = tmp_path / "ft"
    rc = main(["train", "--init-from", str(run / "final"), "--data", str(tmp_path / "chat.jsonl"), "--out", str(ft),
               "--steps", "2", "--seq-len", "64", "--batch-size", "2", "--no-progress"])
    assert rc == 0
    first = json.loads((ft / "metrics.jsonl").read_text().splitlines()[0])
    assert first["lr"] > 0
    before = MiMoForCausalLM.from_pretrained(run / "final", dtype=torch.float32)
    after = MiMoForCausalLM.from_pretrained(ft / "final", dtype=torch.float32)
    changed = [n for (n, p), q in zip(before.named_parameters(), after.parameters(), strict=True) if not torch.equal(p, q)]
    assert changed
    # fine-tuning leaves the balancing biases frozen by default
    for (n, b), c in zip(before.named_buffers(), after.buffers(), strict=True):
        if n.endswith("e_score_correction_bias"):
            assert torch.equal(b, c)


def test_fit_stops_at_a_non_finite_gradient_before_saving_it(tmp_path):
    """A step whose gradient norm is inf (its update makes the weights NaN): fit raises TrainingDiverged naming
    it, and no checkpoint holds weights from it on (the earlier ones stay)."""
    tr = Trainer(tiny(), rows(), quiet(steps=8, out_dir=str(tmp_path), save_every=2, keep_checkpoints=5))
    calls = []

    def poison(g):
        calls.append(1)
        return g * float("inf") if len(calls) == 5 else g
    tr.model.model.embed_tokens.weight.register_hook(poison)
    with pytest.raises(TrainingDiverged, match="step 5: loss .*, gradient norm (inf|nan)"):
        tr.fit()
    assert sorted(p.name for p in tr.checkpoint_root.iterdir()) == ["step-00000002", "step-00000004"]
    assert not (tmp_path / "final").exists()
    assert all(math.isfinite(r["grad_norm"]) for r in tr.history[:4])


def test_train_command_says_when_training_diverges(tmp_path, capsys):
    _write_data(tmp_path)
    train_tokenizer([TEXT], 300, tmp_path / "tok")
    rc = main(["train", "--preset", "tiny", "--tokenizer", str(tmp_path / "tok"),
               "--data", str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "run"), "--steps", "6", "--seq-len", "32", "--batch-size", "2", "--lr", "1e30",
               "--warmup-steps", "0", "--no-progress"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "error: training diverged at step" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "final").exists()


def test_train_command_bad_input(tmp_path, capsys):
    _write_data(tmp_path)
    train_tokenizer([TEXT], 300, tmp_path / "tok")
    assert main(["train", "--preset", "tiny", "--tokenizer", str(tmp_path / "tok"), "--data",
                 str(tmp_path / "nope.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--tokenizer", str(tmp_path / "tok"), "--data",
                 str(tmp_path / "corpus.txt"), "--set", "bogus=1"]) == 2
    assert "unknown config fields bogus" in capsys.readouterr().err


def test_demo_command_smoke(tmp_path, capsys):
    """`mimo-flash demo` end to end with few steps: tokenizer, training, hub checkpoint, reload, generation."""
    assert main(["demo", "--out", str(tmp_path), "--steps", "12", "--quiet"]) == 0
    out = capsys.readouterr().out
    for path in ("tokenizer/tokenizer.json", "checkpoint/config.json", "checkpoint/model.safetensors",
                 "checkpoint/tokenizer.json", "checkpoint/tokenizer_config.json", "run/loss_curve.png",
                 "run/metrics.jsonl"):
        assert (tmp_path / path).exists(), path
    assert "loss curve: " + str(tmp_path / "run" / "loss_curve.png") in out
    assert "[plain]" in out and "expert load" in out
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 12 and recs[-1]["loss"] < recs[0]["loss"]
    cfg = json.loads((tmp_path / "checkpoint" / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 3 and cfg["vocab_size"] == 2048


@pytest.mark.slow
def test_demo_learns(tmp_path):
    """The full demo: the loss falls clearly and MTP speculative decoding reproduces greedy decoding."""
    from mimo_flash.training.demo import run_demo

    res = run_demo(tmp_path, quiet=True)
    assert res["final_lm_loss"] < 0.6 * res["initial_lm_loss"]  # 7.64 -> about 3.7
    gens = res["generations"]
    assert [g["mode"] for g in gens] == ["plain", "MTP speculative, 3 drafts"]
    assert gens[0]["tokens"] > 0
    assert gens[1]["same_as_plain"] and gens[1]["acceptance_length"] > 1.5


def test_rows_of_one_document_train_as_a_plain_batch():
    """Rows that are each one document from position 0 go to the model without positions and segments (the
    plain-batch kernels on a GPU): the same losses and gradients as with them."""
    g = torch.Generator().manual_seed(3)
    data = pack_documents([Document(torch.randint(3, 200, (48,), generator=g).tolist()) for _ in range(8)], 48)
    assert data.one_document_per_row() and not rows().one_document_per_row()
    plain, packed = Trainer(tiny(), data, quiet(steps=2)), Trainer(tiny(), data, quiet(steps=2))
    packed.plain_rows = False
    gp, gk = _capture_grads(plain), _capture_grads(packed)
    for a, b in zip(plain.fit(), packed.fit(), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    for x, y in zip(gp[0], gk[0], strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


_ADAMW_INTERPRETED = r"""
import os
os.environ["TRITON_INTERPRET"] = "1"
import torch
from mimo_flash.training import kernels as tk

def reference(p, g, m, v, step, lr, b1, b2, wd, eps):
    # the kernel's fp32 arithmetic written out, each operation done in fp64 and rounded once to fp32 (which gives
    # the IEEE fp32 result); fma(a, b, c) as the interpreter evaluates it: a product and a sum, each rounded
    op = lambda fn, *xs: fn(*(torch.as_tensor(x, dtype=torch.float32).double() for x in xs)).float()  # noqa: E731
    mul = lambda a, b: op(torch.mul, a, b)  # noqa: E731
    add = lambda a, b: op(torch.add, a, b)  # noqa: E731
    div = lambda a, b: op(torch.div, a, b)  # noqa: E731
    sqrt = lambda a: op(torch.sqrt, a)  # noqa: E731
    fma = lambda a, b, c: add(mul(a, b), c)  # noqa: E731
    lr, b1, b2, wd, eps = (torch.tensor(x, dtype=torch.float32) for x in (lr, b1, b2, wd, eps))
    bc1 = add(1.0, -(b1 ** step))
    bc2_sqrt = sqrt(add(1.0, -(b2 ** step)))
    step_size = div(lr, bc1)
    p = fma(-mul(lr, wd), p, p)
    m = fma(b1, m, fma(-b1, g, g))
    gg = mul(g, g)
    v = fma(b2, v, fma(-b2, gg, gg))
    denom = add(div(sqrt(v), bc2_sqrt), eps)
    return add(p, -div(mul(step_size, m), denom)), m, v

torch.manual_seed(0)
n = tk.ADAMW_BLOCK + 1000  # two programs, the second masked
# hyper-parameters fp32 holds exactly: the interpreter may pass them in either precision
for lr, b1, b2, wd, eps, coef in ((2.0 ** -10, 0.875, 0.984375, 0.125, 2.0 ** -20, None),
                                  (2.0 ** -7, 0.75, 0.9375, 0.0, 2.0 ** -13, None),
                                  (2.0 ** -10, 0.875, 0.984375, 0.125, 2.0 ** -20, 0.3)):
    p, m, v = torch.randn(n), torch.zeros(n), torch.zeros(n)
    rp, rm, rv = p.clone(), m.clone(), v.clone()
    for s in range(1, 4):
        g = torch.randn(n) * 10 ** (s - 2)
        pow1, pow2 = torch.tensor([b1 ** s]), torch.tensor([b2 ** s])  # exact in fp32 for these betas
        c = None if coef is None else torch.tensor([coef])
        tk.adamw_step(p, g, m, v, pow1, pow2, lr, b1, b2, wd, eps, c)
        gs = g if c is None else (g.double() * c.double()).float()  # the gradient scaled (one fp32 rounding)
        rp, rm, rv = reference(rp, gs, rm, rv, s, lr, b1, b2, wd, eps)
        for name, a, b in (("p", p, rp), ("m", m, rm), ("v", v, rv)):
            assert torch.equal(a, b), (name, s, (a - b).abs().max().item())
# the gradient norm's sum of squares over chunks of SQ_CHUNK elements: a tensor of two chunks (the second
# partial), a short one, one of exactly one chunk
xs = [torch.randn(tk.SQ_CHUNK + 4000), torch.randn(3, 7), torch.randn(tk.SQ_CHUNK)]
got = tk.sq_sum(xs).item()
want = sum(float(x.double().square().sum()) for x in xs)
assert abs(got - want) <= 1e-5 * want, (got, want)
print("ok")
"""


def test_adamw_and_norm_kernels_in_the_interpreter():
    """training/kernels.py adamw_step (the step of training.optim.AdamW for large CUDA tensors), run by Triton's
    CPU interpreter on fp32 tensors: equal, element for element over three steps with and without weight decay
    and with a clipping factor, to its fp32 arithmetic written out (the GPU test compares it with torch's fused
    AdamW); and training/kernels.py sq_sum (the gradient norm's pass) against the fp64 sum of squares."""
    run_in_triton_interpreter(_ADAMW_INTERPRETED)


def test_adamw_is_torch_adamw_off_cuda():
    """Where no tensor takes the kernel (here the CPU), training.optim.AdamW is torch.optim.AdamW: same updates,
    and state dicts that load into each other."""
    from mimo_flash.training.optim import AdamW
    ma, mb = tiny(), tiny()
    oa = AdamW(param_groups(ma, 0.1), lr=1e-3, betas=(0.9, 0.95))
    ob = torch.optim.AdamW(param_groups(mb, 0.1), lr=1e-3, betas=(0.9, 0.95))
    ids = torch.randint(0, 200, (2, 16))
    for _ in range(2):
        for m, o in ((ma, oa), (mb, ob)):
            m(ids, labels=ids).loss.backward()
            o.step()
            o.zero_grad(set_to_none=True)
    for p, q in zip(ma.parameters(), mb.parameters(), strict=True):
        assert torch.equal(p, q)
    ob.load_state_dict(oa.state_dict())
    oa.load_state_dict(ob.state_dict())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("clip", [False, True])
def test_adamw_matches_torch_fused_on_cuda(dtype, clip):
    """training.optim.AdamW on CUDA (Triton kernel for tensors of >= MIN_NUMEL elements, torch's fused step for
    the rest) gives bit for bit the parameters and moments of torch.optim.AdamW(fused=True), with and without
    weight decay, over steps whose gradients change scale; with clip_coef, those of scaling the gradients in place
    first; its state dict loads into torch's."""
    from mimo_flash.training import optim
    torch.manual_seed(0)
    shapes = [(512, 300), (optim.MIN_NUMEL + 7,), (64,), (3, 1000, 40)]
    ps = [torch.randn(s, device="cuda", dtype=dtype) for s in shapes]
    qs = [p.clone() for p in ps]
    groups = lambda xs: [dict(params=xs[:2], weight_decay=0.1), dict(params=xs[2:], weight_decay=0.0)]  # noqa: E731
    kw = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    oa, ob = optim.AdamW(groups(ps), **kw), torch.optim.AdamW(groups(qs), **kw)
    for step in range(5):
        for p, q in zip(ps, qs, strict=True):
            p.grad = torch.randn_like(p) * 10.0 ** (step - 3)
            q.grad = p.grad.clone()
        coef = torch.rand((), device="cuda") if clip else None
        oa.step(clip_coef=coef)
        if clip:
            torch._foreach_mul_([q.grad for q in qs], coef)
        ob.step()
        for i, (p, q) in enumerate(zip(ps, qs, strict=True)):
            for name, a, b in (("param", p, q), ("exp_avg", oa.state[p]["exp_avg"], ob.state[q]["exp_avg"]),
                               ("exp_avg_sq", oa.state[p]["exp_avg_sq"], ob.state[q]["exp_avg_sq"])):
                assert torch.equal(a, b), (step, i, name, (a != b).sum().item(),
                                           (a.float() - b.float()).abs().max().item())
    assert float(oa.state[ps[0]]["step"]) == 5.0
    ob.load_state_dict(oa.state_dict())


@pytest.mark.gpu
def test_grad_norm_on_cuda():
    """clip_grad_norm on one CUDA process (training/kernels.py sq_sum) gives the gradients' global norm (fp64
    reference), the same number every time, and scales the gradients as before."""
    from mimo_flash.distributed import clip_coefficient, clip_grad_norm
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=torch.bfloat16)) for s in ((513, 300), (7,), (70000,))]
    for p in ps:
        p.grad = torch.randn_like(p) * 3
    want = sum(float(p.grad.double().square().sum()) for p in ps) ** 0.5
    ctx = ParallelContext(device=torch.device("cuda"))
    norms = [clip_grad_norm(ps, 0.0, ctx) for _ in range(3)]
    assert all(torch.equal(n, norms[0]) for n in norms)
    assert abs(norms[0].item() - want) <= 1e-5 * want
    before = [p.grad.clone() for p in ps]
    clip_grad_norm(ps, 1.0, ctx)
    coef = clip_coefficient(norms[0], 1.0).to(torch.bfloat16).float()  # _foreach_mul_ casts it to the grads' dtype
    for p, b in zip(ps, before, strict=True):
        torch.testing.assert_close(p.grad.float(), (b.float() * coef).to(torch.bfloat16).float(), rtol=0, atol=0)


def test_deterministic_algorithms_only_inside_the_steps():
    """cfg.deterministic switches torch's deterministic algorithms on while a step runs and gives the
    process its own setting back afterwards."""
    assert not torch.are_deterministic_algorithms_enabled()
    tr = Trainer(tiny(), rows(), quiet(steps=2, deterministic=True))
    seen = []
    tr.optimizer.register_step_pre_hook(lambda *_: seen.append(torch.are_deterministic_algorithms_enabled()))
    assert not torch.are_deterministic_algorithms_enabled()
    tr.train_step()
    assert not torch.are_deterministic_algorithms_enabled()
    tr.fit()
    assert seen == [True, True] and not torch.are_deterministic_algorithms_enabled()


def test_convert_writes_a_training_checkpoint_in_hub_format(tmp_path):
    """`mimo-flash convert RUN/checkpoints/step-N DST` (a DCP checkpoint) writes the weights the Trainer had,
    bf16 and FP8 as asked."""
    from mimo_flash.quant.blocks import FP8
    from mimo_flash.cli import main

    tr = Trainer(tiny(num_hidden_layers=2), rows(),
                 quiet(steps=2, out_dir=str(tmp_path / "run"), bias_update_rate=1e-2))
    tr.fit()
    step = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert main(["convert", str(step), str(tmp_path / "fp32"), "--dtype", "fp32"]) == 0
    assert main(["convert", str(step), str(tmp_path / "fp8"), "--fp8"]) == 0
    got = MiMoForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.float32).state_dict()
    want = tr.model.state_dict()
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    assert any(v.abs().sum() > 0 for k, v in got.items() if k.endswith("e_score_correction_bias"))
    from safetensors import safe_open

    with safe_open(str(next((tmp_path / "fp8").glob("*.safetensors"))), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == FP8
    assert main(["convert", str(step), str(tmp_path / "bad"), "--layout", "transformers"]) == 2
