"""Built-in example models that kiln builds offline from data that packages ship."""
