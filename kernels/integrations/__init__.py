"""Adapters that put spear_kernels inside other trainers. Each submodule imports its trainer library
(``spear_kernels.integrations.trl`` needs ``trl``, ``spear_kernels.integrations.verl`` needs ``verl``);
importing this package imports none of them, so spear_kernels itself still depends on torch only."""
