"""Everything about attention, in one folder. Read in this order:

  masking.py            the one masking convention (fully masked rows -> 0) and the online softmax
  platform.py           the (kernel, sequence-parallel strategy) pair and the platform it is for
  reference.py          attention that materialises scores: the "xla" kernel and the ground truth
  recompute.py          the "xla" kernel in training: scores recomputed in the backward (O(L) residuals)
  blockwise.py          block forward/backward with LSE, merging partial results (plain JAX)
  block_kernels.py      the per-block kernel ring/Ulysses run: blockwise or the Pallas kernels
  ring.py, ulysses.py   the sequence-parallel algorithms (per shard, inside shard_map)
  sequence_parallel.py  ring | ulysses | hybrid over the ambient mesh
  dispatch.py           `dot_product_attention`, what the model calls

The Pallas kernels themselves live in `kernels/` (imported as `af_next_kernels`) and depend only on
masking.py and reference.py from here. This __init__ imports nothing, so importing one module never
pulls in the others (no import cycle with `parallel` or the kernels).
"""
