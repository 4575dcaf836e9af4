"""Build spear_engine, the spear_kernels Triton library and the C++ replay index (pybind11)."""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

replay_index = Pybind11Extension(
    "spear_engine._replay_index",
    ["csrc/replay_index.cpp", "csrc/bindings.cpp"],
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=["-O3"],
)

setup(
    name="spear-engine",
    version="0.1.0",
    description="SPEAR (self-imitation with progressive exploration) for agentic RL: algorithms, "
    "Triton kernels, a C++ replay index",
    python_requires=">=3.10",
    packages=[
        "spear_engine",
        "spear_engine.algorithms",
        "spear_engine.replay",
        "spear_engine.rollout",
        "spear_engine.envs",
        "spear_engine.envs.sandbox",
        "spear_engine.train",
        "spear_kernels",
        "spear_kernels.integrations",
    ],
    package_dir={"spear_kernels": "kernels"},
    package_data={"spear_engine": ["presets/*.yaml", "experiments/*.yaml", "data/*.json.gz"]},
    ext_modules=[replay_index],
    cmdclass={"build_ext": build_ext},
    # torch and triton are deliberately absent: an unpinned torch requirement pulls a multi-GB CUDA
    # build on CPU machines, and GPU users bring their own. requirements.txt pins the pair.
    install_requires=["numpy>=1.26", "pydantic>=2.7", "pyyaml>=6.0", "rich>=13"],
    extras_require={
        "dev": ["pytest==9.2.0", "pytest-benchmark==5.3.1", "hypothesis>=6.100", "ruff>=0.6"],
    },
    entry_points={"console_scripts": ["spear=spear_engine.cli:main"]},
    zip_safe=False,
)
