"""tpflax internals; the public API is the flat namespace in tpflax/__init__.py."""
