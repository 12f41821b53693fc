"""Speed-ups that lean on a private API or a platform assumption, kept apart from the plain path.

Each module here has an ``is_available()`` probe and a plain fallback, and
its callers use it only where the probe says it holds:

* ``adam``: the outer step calls torch's fused Adam kernel directly, skipping
  ``Optimizer.step``'s Python around it (a private torch function; probed
  against ``torch.optim.Adam``'s own step, bit for bit).
* ``malloc``: glibc's malloc keeps the memory a meta-step frees (process-wide
  ``mallopt`` settings; only in processes distmaml owns: its command line and
  its Ray workers, never a library caller's).

The shared-memory sum of a collective group (``engine/shm.py``) relies on
x86-64's store order and is used only there (``shm.supported``).
"""
