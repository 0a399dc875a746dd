"""Embedded data sets: the templated sentiment set (:mod:`.sentiment`) and the persona JSONL files."""
