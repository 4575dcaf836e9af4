"""Environments: text in, text out, seeded, with train / eval splits and a gold solution path.

:mod:`.base` is the protocol and the registry (:func:`~spear_engine.envs.base.make_env`). Registered
environments: ``alfworld`` (:mod:`.alfworld`, the ALFWorld text engine on procedurally generated
problems from :mod:`.alfworld_tasks`), ``webshop`` (:mod:`.webshop`, a WebShop-style store with
WebShop's action grammar over the synthetic catalogue of :mod:`.webshop_catalogue`), ``math``
(:mod:`.math_tool`, reasoning-gym tasks solved with a Python tool; answers are scored by
:mod:`.math_score_child` inside the sandbox) and ``twx`` (:mod:`.twx`, TextWorldExpress games).
:mod:`.sandbox` runs model-written Python in a locked-down subprocess. Environments know nothing of
tokens or models.
"""
