"""Model families, one module per family (see docs/architecture.md)."""
