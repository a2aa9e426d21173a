"""simret: image retrieval and few-shot learning with SimPool-pooled timm encoders."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "simret" / "__init__.py").read_text()).group(1)

setup(
    name="simret",
    version=VERSION,
    description="Image retrieval and few-shot learning with SimPool (ICCV 2023) pooled timm encoders",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["simret", "simret.*"]),
    package_data={"simret.serve": ["static/*.html", "static/*.css", "static/*.js"]},  # the search page
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "timm>=1.0",
        "faiss-cpu>=1.7.4",
        "h5py>=3.8",
        "numpy>=1.23",
        "scikit-learn>=1.2",
        "click>=8.1",
        "tqdm>=4.64",
        "pillow>=9.4",
        "safetensors>=0.4",
        "scikit-image>=0.21",  # ships the real photographs of the embedded demo/test data
        # simret serve (in the base install so every venv, make demo's too, can serve its index)
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "python-multipart>=0.0.9",
    ],
    extras_require={
        # faiss with CUDA kernels (replaces faiss-cpu at import time when both are present)
        "gpu": ["faiss-gpu-cu12>=1.8"],
        # the search service alone (already in install_requires; kept so `pip install simret[serve]` reads as meant)
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "python-multipart>=0.0.9"],
        # httpx: FastAPI's test client; selenium: the page's browser test (with Debian's chromium + chromium-driver)
        "dev": ["pytest>=7.4", "ruff>=0.4", "hypothesis>=6.80", "httpx>=0.24", "selenium>=4.11"],
    },
    entry_points={"console_scripts": ["simret=simret.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Image Recognition",
        "License :: OSI Approved :: Apache Software License",
    ],
)
