"""Parallelism applied on top of the single-device model: DeepSpeed expert parallelism and engine config.

Submodules import deepspeed; import them explicitly (``fusemoe.parallel.expert_parallel``,
``fusemoe.parallel.deepspeed_moe``). ``fusemoe.parallel.engine`` is plain Python.
"""
