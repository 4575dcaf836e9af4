"""spear_engine: SPEAR (self-imitation learning with progressive exploration) for agentic RL.

Algorithms (GRPO, GiGPO, Dr.BoT, SPEAR) as pure tensor functions, a C++ replay index for
self-imitation, Triton kernels for the token-level math (``spear_kernels``), and the trainer.
"""

__version__ = "0.1.0"
