"""Training: data packing, the trainer (resume-exact), the demo (parallelism: distributed/)."""

from ..tokenizer import Tokenizer
from .data import Document, PackedRows, RowSampler, load_rows, pack_documents, read_documents
from ..distributed.context import ParallelContext, init_distributed
from .config import TrainConfig
from .trainer import Trainer, TrainingDiverged

__all__ = ["Document", "PackedRows", "ParallelContext", "RowSampler", "Tokenizer", "TrainConfig", "Trainer",
           "TrainingDiverged", "init_distributed", "load_rows", "pack_documents", "read_documents"]
