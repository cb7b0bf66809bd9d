"""Training: data packing, the trainer (resume-exact), FSDP2 + expert parallelism, the demo."""

from ..tokenizer import Tokenizer
from .data import Document, PackedRows, RowSampler, load_rows, pack_documents, read_documents
from .parallel import ParallelContext, init_distributed
from .trainer import TrainConfig, Trainer

__all__ = ["Document", "PackedRows", "ParallelContext", "RowSampler", "Tokenizer", "TrainConfig", "Trainer",
           "init_distributed", "load_rows", "pack_documents", "read_documents"]
