"""A run, from a config to its result: assembled (``assembly``), driven step by step (``trainer``),
checkpointed (``checkpoint``), with the user's own model and tasks (``usercode``, ``shipping``), and
scored on held-out tasks (``evaluate``, ``results``). docs/architecture.md, "Layers"."""
