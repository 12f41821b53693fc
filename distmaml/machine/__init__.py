"""What the process and its machine give a run: memory a worker may still allocate (``memory``),
signals that stop a run cleanly (``interrupt``), environment variables set for a block (``environ``).
Below everything but storage, errors and typing: docs/architecture.md, "Layers"."""
