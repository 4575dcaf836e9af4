"""Training: everything between a rollout batch and updated weights, for a causal LM.

:mod:`.trainer` drives a run (rollout, :func:`spear_engine.step.train_on_batch`, weight sync, metrics,
evaluation, checkpoints) that :mod:`.build` assembles from the config. :mod:`.learner` is the LM side
of a step; :mod:`.policy` (transformer -> hidden states -> fused log-prob and entropy) and
:mod:`.packed_attention` (rows packed into one sequence) make its forward; :mod:`.update` is the actor
update (on-policy and replay mini-batches, loss normalisation); :mod:`.backends` the optimizer side
(plain torch or DeepSpeed ZeRO-3) and :mod:`.collectives` the cross-rank reductions. Also:
:mod:`.sft` (cold-start supervised warm-up), :mod:`.checkpoint` (crash-safe checkpoints) and
:mod:`.perf` (token counts, model FLOPs, MFU).
"""
