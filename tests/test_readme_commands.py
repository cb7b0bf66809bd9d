"""Every command line of README.md's "Using it" block, run as printed on tiny inputs (issue 25).

Substitutions, and nothing else: the placeholders (DIR, FILES..., RUN, SRC, DST, TOKENS, N, T, P, K, "...")
become tiny files and values (TOKENS: the token directory the tokenize line writes); each line runs once
without its optional [...] groups and once with all of them (the first of `a|b` choices); train lines get a
few short steps (--steps 2, --seq-len 32, --batch-size 2) and the fine-tuning lines their own RUN, the
torchrun line's `...` the pre-training line's arguments. The torchrun
lines run with their two processes (train with --ep 2 --cp 2, generate with --tp 2; gloo on the CPU). `serve` runs in a subprocess until
/v1/models answers.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mimo_flash.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHORT_TRAINING = ["--steps", "2", "--seq-len", "32", "--batch-size", "2", "--no-progress"]


def readme_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Using it\n```\n(.*?)```", text, re.S)
    assert block, "README.md has no 'Using it' code block"
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line.startswith(("mimo-flash ", "torchrun "))]


def variants(line: str) -> list[str]:
    """The line without its [...] groups, and with all of them (first alternative of a|b)."""
    bare = re.sub(r"\s*\[[^\]]*\]", "", line)
    full = re.sub(r"\[([^\]]*)\]", lambda m: re.sub(r"(\S+)\|\S+", r"\1", m.group(1)), line)
    return [bare] if full == bare else [bare, full]


def substitute(line: str, paths: dict) -> list[str]:
    argv = shlex.split(line)
    out = []
    for i, a in enumerate(argv):
        if a == "..." and argv[i - 1] == "train":  # torchrun ... train ...: the pre-training line's arguments
            out += ["--preset", "tiny", "--data", str(paths["small"]), "--out", str(paths["dist_run"])]
        elif a == "...":
            out.append("The for statement")
        else:
            out.append({"DIR": str(paths["dir"]), "FILES...": str(paths["small"]), "RUN": str(paths["run"]),
                        "chat.jsonl": str(paths["chat"]), "SRC": str(paths["dir"]), "DST": str(paths["dst"]),
                        "TOKENS": str(paths["tokens"]),
                        "N": "4", "T": "0.8", "P": "0.9", "K": "1"}.get(a, a))
    if out[0] == "mimo-flash" and out[1] == "train":
        out += SHORT_TRAINING
        if "--resume" in out:
            out[out.index("--steps") + 1] = "4"
        if "--init-from" in out:
            out[out.index("--out") + 1] = str(paths["ft_run"])
    if out[0] == "torchrun" and "train" in out:
        out += SHORT_TRAINING
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_serve(argv: list[str], env: dict) -> None:
    port = argv[argv.index("--port") + 1]
    proc = subprocess.Popen([sys.executable, "-m", "mimo_flash.cli"] + argv[1:], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
                    assert json.loads(r.read())["data"], "no model listed"
                    return
            except OSError:
                assert time.monotonic() < deadline, "serve did not answer within 120 s"
                time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_readme_usage_lines_run_as_printed(tmp_path, monkeypatch, capsys):
    from pydoc_data.topics import topics

    paths = {"small": tmp_path / "small.txt", "run": tmp_path / "RUN", "ft_run": tmp_path / "FT",
             "dist_run": tmp_path / "DIST", "chat": tmp_path / "chat.jsonl", "dst": tmp_path / "DST",
             "tokens": tmp_path / "TOKENS"}
    paths["dir"] = paths["run"] / "final"
    paths["small"].write_text("\n\n".join(topics[k] for k in sorted(topics)[:6]))
    paths["chat"].write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {w}?"},
                                                              {"role": "assistant", "content": f"{w} is a word."}]})
                                     + "\n" for w in ("for", "while", "if", "def")))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}

    lines = readme_lines()
    # training first: the other lines use what it wrote (DIR); tokenize (which reads DIR) before the fine-tuning
    lines.sort(key=lambda line: (" train " not in line and " tokenize " not in line, "--init-from" in line,
                                 line.startswith("torchrun")))
    seen = set()
    for line in lines:
        for variant in variants(line):
            argv = substitute(variant, paths)
            if argv[0] == "torchrun":
                seen.add("torchrun")
                r = subprocess.run([sys.executable, "-m", "torch.distributed.run"] + argv[1:], env=env,
                                   capture_output=True, text=True, timeout=600, cwd=tmp_path)
                # a rank's own error comes first in stderr, torchrun's summary last
                assert r.returncode == 0, (variant, r.stdout[-2000:], r.stderr[:3000], r.stderr[-1500:])
                continue
            seen.add(argv[1])
            if argv[1] == "serve":
                argv[argv.index("--port") + 1] = str(free_port())
                run_serve(argv, env)
                continue
            if argv[1] == "chat":
                monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/exit\n"))
            rc = main(argv[1:])
            out, err = capsys.readouterr()
            assert rc == 0, (variant, out[-2000:], err[-2000:])
    assert seen == {"generate", "chat", "serve", "convert", "train", "tokenize", "kv-cache", "plan", "torchrun"}
    assert (paths["dst"] / "config.json").exists() and (paths["ft_run"] / "final" / "config.json").exists()
    assert (paths["tokens"] / "header.json").exists()
    assert (paths["run"] / "tokenizer" / "tokenizer.json").exists()  # trained on --data, no --tokenizer given
