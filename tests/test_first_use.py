"""Issue 25, first use and bad input: the README's commands as printed, defaults that fit the device,
clear errors for impossible sizes and non-finite numbers, defaulted config fields named, stale convert
temporaries removed, and the last training step's metrics."""

from __future__ import annotations

import re
import time

import pytest
import torch

from mimo_flash import MiMoConfig, MiMoForCausalLM
from mimo_flash.training import Document, TrainConfig, Trainer, pack_documents


def _rows(n_docs=16, T=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pack_documents([Document(torch.randint(3, 200, (70,), generator=g).tolist()) for _ in range(n_docs)], T)


# ------------------------------------------------------------------ item 6: the last step's metrics
def test_every_steps_time_is_its_own_work_including_the_last():
    """fit() reads step n's metrics after issuing step n + 1; the last step has no successor, and its
    step_time used to be the gap between two reads (0.6 ms for a 0.4 s step, 1.6M tokens/s)."""
    torch.manual_seed(0)
    model = MiMoForCausalLM(MiMoConfig.preset("tiny"))
    tr = Trainer(model, _rows(), TrainConfig(steps=5, batch_size=4, warmup_steps=1, progress=False, plot=False))
    t0 = time.perf_counter()
    hist = tr.fit()
    wall = time.perf_counter() - t0
    times = [r["step_time"] for r in hist]
    # each step's interval is disjoint from the others' and inside fit()
    assert sum(times) <= wall
    # a step is not 5x faster than the fastest other step (the bug made the last one ~1000x faster)
    assert times[-1] >= 0.2 * min(times[:-1]), times
    for r in hist:
        assert r["tokens_per_s"] == pytest.approx(4 * 64 / r["step_time"])


@pytest.mark.gpu
def test_last_step_metrics_on_cuda():
    from mimo_flash.distributed import ParallelContext

    torch.manual_seed(0)
    model = MiMoForCausalLM(MiMoConfig.preset("tiny"))
    ctx = ParallelContext(device=torch.device("cuda"))
    tr = Trainer(model, _rows(), TrainConfig(steps=6, batch_size=4, warmup_steps=1, progress=False, plot=False,
                                              dtype="float32"), ctx)
    t0 = time.perf_counter()
    hist = tr.fit()
    wall = time.perf_counter() - t0
    times = [r["step_time"] for r in hist]
    assert sum(times) <= wall * 1.05
    assert times[-1] >= 0.2 * min(times[1:-1]), times


# ------------------------------------------------------------------ item 7: non-finite numbers
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("kw, field", [
    (dict(temperature=NAN), "temperature"), (dict(temperature=INF), "temperature"),
    (dict(temperature=1.0, top_p=NAN), "top_p"), (dict(temperature=1.0, min_p=NAN), "min_p"),
    (dict(temperature=0.0, repetition_penalty=NAN), "repetition_penalty"),
    (dict(temperature=0.0, repetition_penalty=INF), "repetition_penalty"),
    (dict(temperature=0.0, top_p=NAN), "top_p"),  # greedy still checks every value
])
def test_sampling_params_from_a_request_refuse_non_finite_numbers(kw, field):
    from mimo_flash.generation import SamplingParams

    with pytest.raises(ValueError, match=f"^{field}=(nan|inf)"):
        SamplingParams.from_request(**kw)


def test_sampling_params_from_a_request_zero_temperature_is_greedy():
    from mimo_flash.generation import SamplingParams

    assert SamplingParams.from_request(0.0) == SamplingParams(do_sample=False, temperature=1.0)
    assert SamplingParams.from_request(0.7, top_p=0.9) == SamplingParams(True, 0.7, None, 0.9)


def test_generate_api_refuses_nan_temperature():
    torch.manual_seed(0)
    model = MiMoForCausalLM(MiMoConfig.preset("tiny")).eval()
    ids = torch.tensor([[5, 6, 7]])
    for kw in (dict(do_sample=True, temperature=NAN), dict(do_sample=False, temperature=NAN),
               dict(do_sample=True, top_p=NAN)):
        with pytest.raises(ValueError, match="nan"):
            model.generate(ids, max_new_tokens=2, **kw)


@pytest.mark.parametrize("argv", [
    ["generate", "--model", "M", "--prompt", "x", "--temperature", "nan"],
    ["generate", "--model", "M", "--prompt", "x", "--top-p", "inf"],
    ["chat", "--model", "M", "--repetition-penalty", "nan"],
    ["train", "--preset", "tiny", "--data", "d", "--lr", "nan"],
    ["train", "--preset", "tiny", "--data", "d", "--grad-clip", "inf"],
    ["train", "--preset", "tiny", "--data", "d", "--mtp-weight=-inf"],
])
def test_cli_float_options_refuse_non_finite_numbers(argv, capsys):
    from mimo_flash.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    given = ("--model", "--prompt", "--preset", "--data")
    flag = next(a for a in argv if a.startswith("--") and a not in given).split("=")[0]
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "not a finite number" in err, err


def test_every_float_option_of_every_command_is_checked():
    """No float option is parsed by plain float() (which accepts nan and inf)."""
    from mimo_flash.cli import build_parser, finite_float

    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and "train" in a.choices)
    floats = [(name, a.dest) for name, p in sub.choices.items() for a in p._actions if a.type is float]
    assert floats == []
    checked = [(name, a.dest) for name, p in sub.choices.items() for a in p._actions if a.type is finite_float]
    assert {("train", "lr"), ("generate", "temperature"), ("chat", "top_p")} <= set(checked)


@pytest.mark.parametrize("key, value, field", [
    ("layernorm_epsilon", NAN, "rms_norm_eps"), ("rope_theta", INF, "rope_theta"),
    ("attention_value_scale", NAN, "attention_value_scale"), ("routed_scaling_factor", INF, "routed_scaling_factor"),
    ("initializer_range", NAN, "initializer_range"), ("attention_value_scale", "0.7", "attention_value_scale"),
    ("tie_word_embeddings", "no", "tie_word_embeddings"), ("num_nextn_predict_layers", "3", "num_nextn_predict_layers"),
])
def test_config_floats_must_be_finite(key, value, field):
    d = MiMoConfig.preset("tiny").to_dict()
    d.pop("rope_parameters")  # else its rope_theta wins over the top-level one
    d[key] = value
    with pytest.raises(ValueError, match=f"MiMoConfig.{field}: must be"):
        MiMoConfig.from_dict(d)


# ------------------------------------------------------------------ item 4: defaulted config fields
def test_a_custom_config_missing_a_field_names_it(tmp_path):
    import json

    d = MiMoConfig.preset("tiny").to_dict()
    del d["num_experts_per_tok"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.warns(UserWarning, match=r"config.json: .*does not set num_experts_per_tok; .*num_experts_per_tok=8"):
        c = MiMoConfig.from_pretrained(tmp_path)
    assert c.num_experts_per_tok == 8  # still the released value, as before


def test_the_released_config_takes_its_missing_fields_silently():
    import warnings

    d = MiMoConfig.preset("flash").to_dict()
    del d["num_experts_per_tok"], d["num_nextn_predict_layers"]  # the hub's config.json has no MTP count
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = MiMoConfig.from_dict(d)
    assert c == MiMoConfig.preset("flash")


def test_a_missing_num_hidden_layers_is_named():
    d = MiMoConfig.preset("tiny").to_dict()
    del d["num_hidden_layers"]
    with pytest.raises(ValueError, match="num_hidden_layers is missing") as e:
        MiMoConfig.from_dict(d)
    assert "hybrid_layer_pattern" not in str(e.value)


def test_a_derived_error_names_the_missing_field():
    d = MiMoConfig.preset("tiny").to_dict()
    del d["n_routed_experts"]
    d["n_group"] = 3  # 256 experts (the released number) do not split into 3 groups
    with pytest.raises(ValueError, match=r"n_group.*not in the config.*n_routed_experts=256"):
        MiMoConfig.from_dict(d)


def test_the_cli_prints_the_warning_as_one_line(tmp_path, capsys):
    import json

    from mimo_flash.cli import main

    d = MiMoConfig.preset("tiny").to_dict()
    del d["num_experts_per_tok"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert main(["kv-cache", "--model", str(tmp_path), "--context", "64"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("mimo-flash kv-cache: warning: ") and "num_experts_per_tok" in err
    assert err.count("\n") == 1


# ------------------------------------------------------------------ items 1-3: the train command
def _small_text(tmp_path):
    from pydoc_data.topics import topics

    f = tmp_path / "small.txt"
    f.write_text("\n\n".join(topics[k] for k in sorted(topics)[:4]))
    return f


def test_train_from_scratch_trains_a_tokenizer_of_the_models_vocab_size(tmp_path, capsys):
    from mimo_flash.cli import main
    from mimo_flash.tokenizer import Tokenizer

    data = _small_text(tmp_path)
    argv = ["train", "--preset", "tiny", "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "1",
            "--seq-len", "16", "--batch-size", "1", "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    tok = Tokenizer.from_pretrained(tmp_path / "run" / "tokenizer")
    assert 256 < tok.vocab_size <= MiMoConfig.preset("tiny").vocab_size
    final = MiMoConfig.from_pretrained(tmp_path / "run" / "final")
    assert final.eos_token_id == tok.eos_id and final.pad_token_id == tok.pad_id
    assert "trained a" in capsys.readouterr().out
    # --resume (and any later run into the same --out) reuses that tokenizer, so the data fingerprint matches
    before = (tmp_path / "run" / "tokenizer" / "tokenizer.json").stat().st_mtime_ns
    assert main(argv[:-7] + ["--steps", "2", "--seq-len", "16", "--batch-size", "1", "--no-progress",
                             "--resume"]) == 0
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").stat().st_mtime_ns == before
    assert "resumed from" in capsys.readouterr().out


def test_a_tokenizer_larger_than_the_vocabulary_says_how_to_fix_it(tmp_path, capsys):
    from mimo_flash.cli import main
    from mimo_flash.training.demo import corpus, train_tokenizer

    train_tokenizer(corpus()[:40], 1024, tmp_path / "tok")
    data = _small_text(tmp_path)
    base = ["train", "--preset", "tiny", "--tokenizer", str(tmp_path / "tok"), "--data", str(data),
            "--steps", "1", "--seq-len", "16", "--batch-size", "1", "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "--set vocab_size=1024" in err, err
    assert main(base + ["--out", str(tmp_path / "b"), "--set", "vocab_size=1024"]) == 0


def test_train_defaults_fit_the_device():
    import argparse

    from mimo_flash.training.commands import DEVICE_DEFAULTS, resolve_defaults

    def resolved(device, **given):
        args = argparse.Namespace(steps=None, seq_len=None, batch_size=None, grad_accum=1, ep=1, cp=1,
                                  keep_checkpoints=2, log_every=None, save_every=0, warmup_steps=None, **given)
        resolve_defaults(args, device)
        return args.steps, args.seq_len, args.batch_size

    assert resolved("cuda") == (1000, 1024, 8)  # unchanged on GPUs
    cpu = resolved("cpu")
    assert cpu == tuple(DEVICE_DEFAULTS["cpu"][k] for k in ("steps", "seq_len", "batch_size"))
    assert cpu[0] * cpu[1] * cpu[2] <= 1000 * 1024 * 8 / 100  # a hundredth of the GPU run's tokens at most


def test_train_help_shows_every_default(capsys):
    import argparse

    from mimo_flash.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    absent_means_none = {"--stop", "--system", "--set", "--preset", "--config", "--init-from", "--data", "--data-dir"}
    for name, p in sub.choices.items():
        entries, current = {}, None  # option -> its text in the printed help
        for line in p.format_help().splitlines():
            m = re.match(r"^  (-[^\s,]+)", line)
            if m:
                current = m.group(1)
                entries[current] = line
            elif current and line.startswith("    "):
                entries[current] += " " + line.strip()
            else:
                current = None
        for a in p._actions:
            if (not a.option_strings or a.required or isinstance(a, argparse._HelpAction) or a.default is False
                    or a.option_strings[0] in absent_means_none):
                continue
            text = entries[a.option_strings[0]]
            assert "default" in text, (name, text)
            if a.default is not None and "(default:" in text:
                assert f"(default: {a.default})" in text, (name, text)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = capsys.readouterr().out
    assert "(default: 1)" in out and "(default: 0.1)" in out and "100 on a CPU" in out


def test_no_progress_prints_a_periodic_line(tmp_path, capsys):
    torch.manual_seed(0)
    model = MiMoForCausalLM(MiMoConfig.preset("tiny"))
    Trainer(model, _rows(), TrainConfig(steps=6, batch_size=2, warmup_steps=1, progress=False, plot=False,
                                        log_every=2)).fit()
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("step ")]
    assert [x.split()[1] for x in lines] == ["1/6", "2/6", "4/6", "6/6"]
    assert all("loss" in x and "tokens/s" in x for x in lines)


@pytest.mark.parametrize("extra, message", [
    (["--seq-len", "6000"], "--seq-len 6000 exceeds the max_position_embeddings"),
    (["--seq-len", "100000"], "use --seq-len 4096 or less"),
    (["--seq-len", "1"], "--seq-len must be at least 2"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--steps", "-5"], "--steps must be at least 1"),
    (["--save-every", "-1"], "--save-every must be >= 0"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints must be at least 1"),
])
def test_impossible_sizes_fail_before_anything_is_allocated(tmp_path, capsys, monkeypatch, extra, message):
    from mimo_flash.cli import main
    from mimo_flash.model import model as model_module

    def no_model(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(model_module.MiMoForCausalLM, "__init__", no_model)
    data = _small_text(tmp_path)
    rc = main(["train", "--preset", "tiny", "--data", str(data), "--out", str(tmp_path / "r")] + extra)
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # no tokenizer trained, nothing written


def test_seq_len_is_checked_against_a_checkpoint_before_loading_it(tmp_path, capsys, monkeypatch):
    from mimo_flash.cli import main
    from mimo_flash.model import model as model_module

    torch.manual_seed(0)
    MiMoForCausalLM(MiMoConfig.preset("tiny", max_position_embeddings=64)).save_pretrained(tmp_path / "ck")
    monkeypatch.setattr(model_module.MiMoForCausalLM, "from_pretrained",
                        classmethod(lambda *a, **k: (_ for _ in ()).throw(AssertionError("weights loaded"))))
    rc = main(["train", "--init-from", str(tmp_path / "ck"), "--data", str(_small_text(tmp_path)),
               "--out", str(tmp_path / "r"), "--seq-len", "65"])
    assert rc == 2 and "exceeds the max_position_embeddings" in capsys.readouterr().err


# ------------------------------------------------------------------ item 5: stale convert temporaries
def _writer(dst, env):
    """A process that starts writing `dst` (its temporary directory, marked) and then waits."""
    import subprocess
    import sys

    script = ("import sys, time; from pathlib import Path; from mimo_flash.checkpoint.files import temp_dir_for; "
              "print(temp_dir_for(Path(sys.argv[1])), flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", script, str(dst)], stdout=subprocess.PIPE, text=True, env=env)
    from pathlib import Path

    return proc, Path(proc.stdout.readline().strip())


def test_convert_removes_the_temporaries_of_killed_writes_only(tmp_path, capsys):
    import os
    import signal
    from pathlib import Path

    from mimo_flash.cli import main

    src, dst = tmp_path / "src", tmp_path / "dst"
    torch.manual_seed(0)
    MiMoForCausalLM(MiMoConfig.preset("tiny")).save_pretrained(src)
    root = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    killed, killed_tmp = _writer(dst, env)
    live, live_tmp = _writer(dst, env)
    try:
        (killed_tmp / "model.safetensors").write_bytes(b"\0" * 4096)  # a half-written shard
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=60)
        foreign = tmp_path / ".dst.tmp-notours"  # our name pattern, no marker: not ours
        foreign.mkdir()
        (foreign / "x").write_text("keep")
        other = tmp_path / ".other.tmp-abc"  # another target's
        other.mkdir()
        assert killed_tmp.is_dir() and live_tmp.is_dir()

        assert main(["convert", str(src), str(dst)]) == 0
        err = capsys.readouterr().err
        assert not killed_tmp.exists()
        assert f"removed {killed_tmp}" in err and str(killed.pid) in err
        assert live_tmp.is_dir() and foreign.is_dir() and other.is_dir()  # in use, or not ours
        assert (dst / "config.json").exists() and not (dst / ".mimo-flash-writing").exists()
        assert sorted(p.name for p in tmp_path.glob(".dst.tmp-*")) == sorted([live_tmp.name, foreign.name])
    finally:
        live.kill()
        live.wait(timeout=60)


# ------------------------------------------------------------------ item 8: the first `make` says what it does
def test_first_make_says_what_it_installs_and_how_long_it_takes(tmp_path):
    """The set-up recipe run for real on a fresh VENV (the virtual environment is created), with the pip
    installs replaced by `true` (PIP_INSTALL, the Makefile's own switch) so that nothing is downloaded."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    if shutil.which("make") is None:
        pytest.fail("GNU make is needed for `make demo` / `make test`")
    root = Path(__file__).resolve().parents[1]
    venv = tmp_path / "venv"
    make = ["make", "--no-print-directory", "-C", str(root)]
    r = subprocess.run(make + ["setup", f"VENV={venv}", f"PYTHON={sys.executable}", "PIP_INSTALL=true"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("mimo-flash: setting up") and "minutes" in r.stdout.split("[1/3]")[0]
    steps = [next(i for i, x in enumerate(lines) if f"[{k}/3]" in x) for k in (1, 2, 3)]
    assert steps == sorted(steps) and "creating the virtual environment" in lines[steps[0]]
    assert lines[-1].startswith("mimo-flash: set-up done in ")
    assert (venv / "bin" / "python").exists() and (venv / ".mimo-flash-installed").exists()
    # the second time: nothing to do, nothing said
    again = subprocess.run(make + ["setup", f"VENV={venv}", "PIP_INSTALL=true"], capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 0 and "setting up" not in again.stdout
    # the README's two commands still resolve to the set-up, then the demo / the tests
    for target, command in (("demo", "mimo-flash demo"), ("test", "-m pytest")):
        dry = subprocess.run(make + ["-n", target, f"VENV={tmp_path / 'fresh'}"], capture_output=True, text=True,
                             timeout=60)
        assert dry.returncode == 0 and "setting up" in dry.stdout and command in dry.stdout.splitlines()[-1]


# ------------------------------------------------------------------ more of the same kind: files the loader reads
@pytest.mark.parametrize("name, content, message", [
    ("tokenizer_config.json", {"eos_token": 5}, "tokenizer_config.json: eos_token: expected a token string"),
    ("tokenizer_config.json", {"pad_token": ["a"]}, "tokenizer_config.json: pad_token: expected a token string"),
    ("generation_config.json", {"eos_token_id": "x"}, "generation_config.json: eos_token_id must be a token id"),
    ("generation_config.json", {"pad_token_id": -3}, "generation_config.json: pad_token_id must be a token id"),
    ("config.json", {"torch_dtype": "float99"}, "MiMoConfig.torch_dtype: unknown dtype 'float99'"),
    ("config.json", {"eos_token_id": "x"}, "MiMoConfig.eos_token_id: must be a token id"),
    ("config.json", {"bos_token_id": 1.5}, "MiMoConfig.bos_token_id: must be a token id"),
])
def test_bad_fields_in_the_files_generate_reads_are_named(tmp_path, capsys, name, content, message):
    import json

    from mimo_flash.cli import main
    from mimo_flash.training.demo import corpus, train_tokenizer

    torch.manual_seed(0)
    MiMoForCausalLM(MiMoConfig.preset("tiny")).save_pretrained(tmp_path)
    train_tokenizer(corpus()[:10], 300, tmp_path)
    f = tmp_path / name
    f.write_text(json.dumps({**(json.loads(f.read_text()) if f.exists() else {}), **content}))
    rc = main(["generate", "--model", str(tmp_path), "--prompt", "The", "--device", "cpu", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
