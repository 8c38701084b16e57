"""Data pipeline: JSONL manifests of audio + conversations -> packed, sharded, resumable batches.

Data-only dependencies (grain, librosa, soundfile, sentencepiece, tokenizers) are imported only
inside this package; the model and kernels never import it. Entry points: `DataConfig`,
`make_batch_iterator`, `load_tokenizer`; the CLI is
`python -m af_next_jax.data {inspect,make-demo,build-shards,from-hf-dataset}`. ArrayRecord shards
(built by an Apache Beam pipeline, build_shards.py) are read beside manifests; Beam itself is only
imported by `build-shards`.
"""

from af_next_jax.data.pipeline import BatchIterator, DataConfig, SkipThresholdExceeded, make_batch_iterator
from af_next_jax.data.tokenizer import Tokenizer, load_tokenizer

__all__ = ["BatchIterator", "DataConfig", "SkipThresholdExceeded", "Tokenizer", "load_tokenizer",
           "make_batch_iterator"]
