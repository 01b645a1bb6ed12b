"""Quasar: speculative decoding with quantized verification.

`backends/` and `ops/` live at the top level of the repository but are installed as
`quasar.backends` and `quasar.ops` (a bare top-level `ops` package collides with PyPI).
"""
from setuptools import find_packages, setup

setup(
    name="quasar",
    version="0.1.0",
    description="Speculative decoding with quantized verifiers on CUDA, Ascend NPU and CPU",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["quasar", "quasar.*"]) + [
        "quasar.backends", "quasar.ops", "quasar.ops.triton"],
    package_dir={"quasar.backends": "backends", "quasar.ops": "ops"},
    package_data={"quasar.ops.triton": ["tuned/*.json"]},
    install_requires=[
        # Install torch first for your hardware (README); this range then installs nothing more.
        "torch>=2.4",
        "transformers>=5.0,<6",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "numpy>=1.26",
    ],
    extras_require={
        "cuda": ["triton>=3.2"],
        "npu": ["torch-npu"],
        "quant": ["llmcompressor>=0.14", "compressed-tensors>=0.19"],
        "gguf": ["gguf>=0.10", "accelerate>=1.0"],
        "plot": ["matplotlib>=3.8"],
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "prometheus_client>=0.20", "httpx>=0.27"],
        "dev": [
            "fastapi>=0.110", "uvicorn>=0.29", "prometheus_client>=0.20", "httpx>=0.27", "openai>=1.30",
            "pytest>=8", "pytest-xdist>=3.5", "scipy>=1.11", "gguf>=0.10", "accelerate>=1.0", "triton>=3.2",
            "llmcompressor>=0.14", "compressed-tensors>=0.19", "matplotlib>=3.8",
        ],
    },
    entry_points={"console_scripts": ["quasar=quasar.cli:main"]},
)
