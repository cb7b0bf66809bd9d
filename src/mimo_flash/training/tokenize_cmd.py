"""`mimo-flash tokenize`: text / JSONL data -> a memory-mapped token directory (training/tokens.py)."""

from __future__ import annotations

from .data import data_files, read_documents
from .tokens import tokenizer_fingerprint, write_tokens


def register(sub) -> None:
    p = sub.add_parser("tokenize", help="tokenize training data once into memory-mapped token files",
                       description="Read text / JSONL files (as `train --data` does), tokenize them and write "
                                   "uint32 tokens, document offsets, target masks and a JSON header (with the "
                                   "tokenizer's fingerprint) into a new directory, written whole or not at all.")
    p.add_argument("--data", nargs="+", required=True,
                   help="text files, JSONL files ({'text'} or chat {'messages'}) or directories of them")
    p.add_argument("--tokenizer", required=True, help="directory with tokenizer.json")
    p.add_argument("--out", required=True, help="the token directory to create (must not exist)")
    p.set_defaults(fn=cmd_tokenize)


def cmd_tokenize(args) -> int:
    from ..tokenizer import Tokenizer

    tok = Tokenizer(args.tokenizer)
    files = data_files(args.data)
    try:
        header = write_tokens(read_documents(files, tok), args.out, tok.pad_id, tokenizer_fingerprint(tok),
                              sources=[str(f) for f in files])
    except FileExistsError as e:
        raise ValueError(str(e)) from None
    print(f"{args.out}: {header['num_tokens']} tokens in {header['num_documents']} documents")
    return 0
