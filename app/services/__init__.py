"""Business rules. Blueprints parse input and call these; these own the transactions."""
