"""The demo: train a tiny MiMo-V2-Flash from scratch on text that ships with Python, then use it.

Steps: corpus (CPython's `pydoc_data.topics`, the text of `help('topics')`: about 0.5 MB of English
about Python, no download) -> byte-level BPE tokenizer trained on it (tokenizers library) -> the
tiny preset with MTP trained for a few minutes on the CPU -> hub-format checkpoint with the tokenizer
-> reload -> generate a continuation, plainly and with MTP speculative decoding when available.
"""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import torch

CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PROMPT = "The for statement is used to"
REPETITION_PENALTY = 1.2  # greedy decoding of a model this small loops without it

# The demo's model: the tiny preset with a vocabulary sized for the BPE and room to learn.
DEMO_MODEL = dict(vocab_size=2048, hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
                  sliding_window=33)
DEMO_TRAIN = dict(seq_len=128, batch_size=8, steps=400, lr=4e-3, warmup_steps=30, min_lr_ratio=0.1,
                  bias_update_rate=1e-3)


def corpus() -> list[str]:
    """The documents of the demo corpus: one per pydoc topic, in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[k].strip() for k in sorted(topics)]


def train_tokenizer(texts: list[str], vocab_size: int, out: Path):
    """Train a byte-level BPE on `texts`; write tokenizer.json and tokenizer_config.json into out.
    Returns the Tokenizer."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from ..tokenizer import Tokenizer

    tok = RawTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|endoftext|>",
              "pad_token": "<|endoftext|>", "unk_token": None, "model_max_length": 4096,
              "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Tokenizer.from_pretrained(out)


@torch.no_grad()
def greedy_generate(model, ids: list[int], max_new_tokens: int) -> list[int]:
    """A minimal greedy loop (full recompute per token) for when model.generate is not there."""
    x = torch.tensor([ids])
    for _ in range(max_new_tokens):
        nxt = model(x).logits[0, -1].argmax()
        x = torch.cat([x, nxt.view(1, 1)], dim=1)
    return x[0, len(ids):].tolist()


def run_generation(model, tokenizer, prompt: str, max_new_tokens: int) -> list[dict]:
    """Generate a greedy continuation of `prompt` plainly and, when the model has `generate`, also with
    MTP speculative decoding (drafts from the MTP layers, verified by the main model).
    Returns one record per way: {"mode", "text", "tokens", "seconds", "tokens_per_s", ...}."""
    ids = tokenizer.encode(prompt)
    results = []
    if not hasattr(model, "generate"):
        t0 = time.perf_counter()
        new = greedy_generate(model, ids, max_new_tokens)
        dt = time.perf_counter() - t0
        return [{"mode": "plain (greedy loop)", "text": tokenizer.decode(new, skip_special_tokens=False), "tokens": len(new), "seconds": dt,
                 "tokens_per_s": len(new) / dt}]
    K = model.config.num_nextn_predict_layers
    for name, k in [("plain", 0)] + ([(f"MTP speculative, {K} drafts", K)] if K else []):
        kw = dict(do_sample=False, repetition_penalty=REPETITION_PENALTY, num_speculative_tokens=k)
        model.generate(torch.tensor([ids]), max_new_tokens=4, **kw)  # warm-up
        t0 = time.perf_counter()
        seq, stats = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, return_stats=True, **kw)
        dt = time.perf_counter() - t0
        new = seq[0, len(ids):].tolist()
        rec = {"mode": name, "text": tokenizer.decode(new, skip_special_tokens=False), "ids": new, "tokens": len(new), "seconds": dt,
               "tokens_per_s": len(new) / dt}
        if k:
            rec.update(acceptance_length=stats.acceptance_length, acceptance_rate=stats.acceptance_rate,
                       same_as_plain=new == results[0]["ids"])
        results.append(rec)
    return results


def run_demo(out: str | Path | None = None, steps: int | None = None, quiet: bool = False) -> dict:
    """The whole demo. Returns a summary dict (losses, paths, timings).

    Runs on one intra-op thread: the matrices are small, and on a machine whose cores are busy
    with other work, torch's spinning OpenMP threads slowed it down five-fold. The thread count and the
    random generator (seeded for a reproducible demo) are the caller's again afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            return _run_demo(out, steps, quiet)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out, steps, quiet) -> dict:
    import tempfile

    from ..config import MiMoConfig
    from ..model import MiMoForCausalLM
    from .data import Document, pack_documents
    from .config import TrainConfig
    from .trainer import Trainer

    t_start = time.perf_counter()
    out = Path(out) if out else Path(tempfile.mkdtemp(prefix="mimo-flash-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    texts = corpus()
    tok = train_tokenizer(texts, DEMO_MODEL["vocab_size"], out / "tokenizer")
    docs = [Document(tok.encode(t) + [tok.eos_id]) for t in texts]
    rows = pack_documents(docs, DEMO_TRAIN["seq_len"], tok.pad_id)
    n_tokens = sum(len(d.ids) for d in docs)
    print(f"corpus: {len(texts)} documents of CPython's pydoc topics, {sum(map(len, texts)) / 1e6:.2f} MB -> "
          f"{n_tokens:,} tokens with a {tok.vocab_size}-token byte-level BPE trained on it "
          f"({time.perf_counter() - t_start:.1f}s), packed into {len(rows)} rows of {rows.seq_len}")

    config = MiMoConfig.preset("tiny", **DEMO_MODEL, eos_token_id=tok.eos_id, bos_token_id=None,
                               pad_token_id=tok.pad_id)
    model = MiMoForCausalLM(config)
    print(f"model: tiny MiMo-V2-Flash, {model.num_parameters():,} parameters "
          f"({model.num_parameters(active=True):,} active): {config.num_hidden_layers} layers "
          f"(attention {''.join('S' if x else 'F' for x in config.hybrid_layer_pattern)}: F full, S sliding window "
          f"{config.sliding_window} with sinks), dense layer 0 then MoE {config.n_routed_experts} experts top-"
          f"{config.num_experts_per_tok}, {config.num_nextn_predict_layers} MTP layers")

    tc = TrainConfig(steps=steps or DEMO_TRAIN["steps"], batch_size=DEMO_TRAIN["batch_size"], lr=DEMO_TRAIN["lr"],
                     warmup_steps=DEMO_TRAIN["warmup_steps"], min_lr_ratio=DEMO_TRAIN["min_lr_ratio"],
                     bias_update_rate=DEMO_TRAIN["bias_update_rate"], out_dir=str(out / "run"), progress=not quiet,
                     save_every=0, keep_checkpoints=1)
    trainer = Trainer(model, rows, tc, tokenizer=tok)
    t0 = time.perf_counter()
    hist = trainer.fit()
    train_s = time.perf_counter() - t0
    first = hist[0]
    tail = hist[-max(1, len(hist) // 20):]
    final_loss = sum(r["loss"] for r in tail) / len(tail)
    final_lm = sum(r["lm_loss"] for r in tail) / len(tail)
    final_mtp = sum(r.get("mtp_loss", float("nan")) for r in tail) / len(tail)
    print(f"trained {len(hist)} steps ({trainer.tokens_seen:,} tokens, {trainer.epoch:.1f} epochs) "
          f"in {train_s:.0f}s, {trainer.tokens_seen / train_s:,.0f} tokens/s")
    print(f"loss {first['loss']:.3f} -> {final_loss:.3f} (main-head CE {first['lm_loss']:.3f} -> {final_lm:.3f}, "
          f"MTP CE {first.get('mtp_loss', float('nan')):.3f} -> {final_mtp:.3f}; "
          f"mean of the last {len(tail)} steps)")
    print(trainer.load_summary())

    ckpt = trainer.export(out / "checkpoint")
    model = MiMoForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    print(f"saved the hub-format checkpoint with its tokenizer to {ckpt} and reloaded it")
    from ..tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(ckpt)
    gens = run_generation(model, tok, PROMPT, 48)
    for g in gens:
        extra = ""
        if "acceptance_length" in g:
            extra = (f"; {g['acceptance_length']:.2f} tokens per verification step, "
                     f"{100 * g['acceptance_rate']:.0f}% of drafts accepted; "
                     f"{'identical to' if g['same_as_plain'] else 'DIFFERS from'} the plain output")
        print(f"[{g['mode']}] {g['tokens']} tokens in {g['seconds']:.2f}s = {g['tokens_per_s']:.0f} tokens/s{extra}")
        print(textwrap.indent(PROMPT + g["text"], "    "))
    plot = getattr(trainer, "plot_path", None)
    total = time.perf_counter() - t_start
    if hasattr(model, "generate"):
        print(f"try it: mimo-flash generate --model {ckpt} --prompt 'The while statement' --speculative "
              f"{config.num_nextn_predict_layers} --repetition-penalty {REPETITION_PENALTY}")
    print(f"loss curve: {plot}" if plot else "loss curve: not drawn (matplotlib missing)")
    print(f"metrics: {out / 'run' / 'metrics.jsonl'}; demo wall time {total:.0f}s")
    return {"initial_loss": first["loss"], "final_loss": final_loss, "initial_lm_loss": first["lm_loss"],
            "final_lm_loss": final_lm, "final_mtp_loss": final_mtp, "train_seconds": train_s, "total_seconds": total, "checkpoint": str(ckpt),
            "plot": str(plot) if plot else None, "generations": gens, "steps": len(hist)}
