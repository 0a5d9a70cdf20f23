"""Select the interpreter before any kernel module is imported (``triton.jit`` reads it then)."""

import kernel_checks  # noqa: F401
