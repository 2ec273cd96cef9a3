"""The embedded default model folder (model.json, encoder and text tower weights).

Rebuild it with ``python -m engine.default_model.build``; load it with ``engine.model.load_model()``.
"""
