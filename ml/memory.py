"""Process memory of the training tasks: freed memory goes back to the operating system between big steps.

Arrow's default allocator (mimalloc) keeps freed pages for its own reuse, and NumPy allocates from the C
library's malloc, which cannot reuse them: at 1M customers the baskets task held 0.5-0.8 GB of freed Arrow
buffers (the lines as read, the scoring's intermediate frames) beside NumPy's score blocks. With both on the
C allocator, one ``malloc_trim`` between steps returns what either freed. Tasks that stay on mimalloc (its
peaks are lower for the value task) still hand back the Arrow tables they read once converted.
"""

from __future__ import annotations

import pyarrow as pa


def use_system_allocator() -> None:
    """Arrow allocates from the C library's malloc from now on (in this process)."""
    pa.set_memory_pool(pa.system_memory_pool())


def release_freed_memory() -> None:
    """Give freed memory back to the operating system: Arrow's pool's (mimalloc, unless
    :func:`use_system_allocator` was called) and the C heap's (``malloc_trim`` on glibc)."""
    pa.default_memory_pool().release_unused()
    pa.system_memory_pool().release_unused()
