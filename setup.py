from setuptools import find_packages, setup

setup(
    name="fastmlgan",
    version="0.1.0",
    description="Adversarial learning of label dependency (Tsai & Lee) for multi-label classification: "
    "a compiled, mixed-precision, distributed trainer with DALI loading and Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fastmlgan", "fastmlgan.*"]),
    install_requires=[
        "torch>=2.6",
        "torchvision>=0.21",
        "numpy>=1.24",
        "pillow>=9",
    ],
    extras_require={
        # DALI for CUDA 13 (the CUDA 12 wheel is nvidia-dali-cuda120; see the README).
        "dali": ["nvidia-dali-cuda130>=1.50"],
        "triton": ["triton>=3.2"],
        "dev": ["pytest>=8", "pytest-benchmark>=4", "ruff>=0.5", "matplotlib>=3.7"],
    },
    entry_points={
        "console_scripts": [
            "fastmlgan-train=fastmlgan.train:main",
            "fastmlgan-evaluate=fastmlgan.evaluate:main",
        ]
    },
)
