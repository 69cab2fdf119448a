"""Serving: compiled programs, routing rules, the dispatch core, the engine, predict mode and
exports. Training evaluates dev on these same programs."""
