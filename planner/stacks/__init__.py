"""The software a job runs on (see docs/architecture.md)."""
