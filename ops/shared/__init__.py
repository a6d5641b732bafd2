"""What the norm operators share, each piece once: the check helpers and dtype rules
(checks), the optional backends (backends: the C++ library, the Triton launch modules),
the Triton tile and launch helpers (triton_helpers, which imports triton) and the
double backward's vjp (derivatives). The autograd, vmap and schema machinery that every
op goes through sits one level up, in ops/."""
