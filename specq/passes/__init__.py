"""FX graph passes: capture, find weight matmuls, plan, rewrite. One pass per file."""
