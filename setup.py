"""af-next-jax: JAX/Flax training stack for AF-Next-style audio-language models."""

from setuptools import find_packages, setup

# The Pallas kernels live in the `kernels/` folder but are imported as `af_next_kernels`:
# a top-level package named `kernels` would shadow the PyPI `kernels` package that
# transformers probes for.
setup(
    name="af-next-jax",
    version="0.1.0",
    python_requires=">=3.12",
    packages=find_packages(include=["af_next_jax", "af_next_jax.*"]) + ["af_next_kernels"],
    package_dir={"af_next_kernels": "kernels"},
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "librosa>=0.11",
        "scipy>=1.11",
        "soundfile>=0.13",
        "sentencepiece>=0.2",
        "ml-collections>=1.0",
        "tensorstore>=0.1.70",
        "chex>=0.1.90",
        "safetensors>=0.5",
        "tokenizers>=0.21",
        "numpy>=2.0",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "psutil>=5.9",
        # Rendering a released checkpoint's own chat template (generate --hf-dir on AF3 / Music Flamingo).
        "jinja2>=3.1.6",
    ],
    extras_require={
        # pytest-xdist: `make test` runs the suite on two workers, file by file (filelock: fixtures they share).
        "test": ["pytest>=8", "pytest-xdist>=3.6", "filelock>=3.13", "torch==2.13.0", "transformers>=5.24",
                 "tiktoken>=0.7"],
        # `python -m af_next_jax.data build-shards` (Apache Beam; DirectRunner here, any runner at scale) and
        # `from-hf-dataset` (parquet through pyarrow). Training and inference never import Beam.
        "beam": ["apache-beam>=2.77.0", "pyarrow>=14"],
        # Executing and plotting the notebooks/ ablations (tests/notebooks re-runs them with small steps).
        "notebooks": ["nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29", "matplotlib>=3.8"],
        # TPU VMs, and any host that compiles for a TPU topology (`python -m af_next_jax.compile`):
        # jax's own extra pins the libtpu that matches the installed jax.
        "tpu": ["jax[tpu]"],
        # NVIDIA GPU hosts (CUDA 12 wheels of jaxlib's plugin).
        "cuda": ["jax[cuda12]"],
    },
)
