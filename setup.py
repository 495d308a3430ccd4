"""Reactive Transformer (RxT) for the HuggingFace stack."""

from pathlib import Path

from setuptools import setup

setup(
    name="reactive-transformer",
    version="0.1.0",
    description="Reactive Transformer (RxT): stateful, event-driven language models as native transformers models",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["modeling_rxt", "modeling_rxt.conversion", "trainers", "serving"],
    install_requires=[
        "torch>=2.5",
        "transformers>=5.23,<6",
        "trl>=1.16,<1.17",
        "peft>=0.21,<0.22",
        "accelerate>=1.15,<2",
        "datasets>=4",
        "tokenizers>=0.22",
        "huggingface_hub>=1.0",
        "safetensors>=0.4",
        "matplotlib>=3.7",
        "pyyaml>=6",
    ],
    extras_require={
        "serve": [
            "fastapi>=0.115,<1",
            "uvicorn>=0.30,<1",
            "pydantic>=2.7,<3",
            "psycopg[binary]>=3.2,<4",
            "prometheus-client>=0.20,<1",
        ],
        # the serving tests also need the "serve" extra: scripts/setup_env.sh installs .[dev,serve]
        "dev": [
            "pytest>=8",
            "nltk>=3.9",
            "tensorboard>=2.15",
            "parameterized>=0.9",  # transformers' common test mixins
            "openai>=1.66,<3",
            "httpx>=0.27,<1",
            "ruff>=0.17,<0.18",  # tests/test_lint.py
        ],
        "flash": ["flash-attn>=2.6"],
    },
    entry_points={"console_scripts": ["rxt-serve=serving.__main__:main"]},
)
