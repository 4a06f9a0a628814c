"""Performance figures: what MiCRo's reward, features and training cost against a plain reward model."""
