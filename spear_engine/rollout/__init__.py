"""Rollouts: the policy plays the environments and the episodes come back as exact token ids.

:mod:`.engine` is the engine protocol (token ids in, sampled ids and their log-probs out);
:mod:`.hf` (transformers ``generate``) and :mod:`.vllm` (vLLM in this process) implement it, with
vLLM's sampling semantics in both. :mod:`.resilient` rebuilds a dead engine and retries weight syncs;
:mod:`.weight_sync` streams the trained weights into an engine in buckets (gathering ZeRO-3 shards).
:mod:`.agent_loop` runs many environments at once in the step or the trajectory layout, with
:mod:`.prompts` (prompt texts), :mod:`.parsing` (response text -> action) and :mod:`.env_guard`
(deadlines and result checks around every environment call).
"""
