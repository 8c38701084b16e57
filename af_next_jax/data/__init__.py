"""Data pipeline: JSONL manifests of audio + conversations -> packed, sharded, resumable batches.

Data-only dependencies (grain, librosa, soundfile, sentencepiece, tokenizers) are imported only
inside this package; the model and kernels never import it. Entry points: `DataConfig`,
`make_batch_iterator`, `load_tokenizer`; the CLI is `python -m af_next_jax.data {inspect,make-demo}`.
"""

from af_next_jax.data.pipeline import BatchIterator, DataConfig, SkipThresholdExceeded, make_batch_iterator
from af_next_jax.data.tokenizer import Tokenizer, load_tokenizer

__all__ = ["BatchIterator", "DataConfig", "SkipThresholdExceeded", "Tokenizer", "load_tokenizer",
           "make_batch_iterator"]
