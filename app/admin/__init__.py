"""The operations console: staff see any organization's billing beside the provider's, its timeline and
the queue, and fix it with audited actions (docs/system/OPERATIONS.md)."""
