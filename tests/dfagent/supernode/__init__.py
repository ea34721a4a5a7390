"""Supernode tests.

There must be no ``tests/dfagent/__init__.py``: ``tests/`` is on ``sys.path``, so that directory
would shadow the real ``dfagent`` package (pytest's ``pythonpath = ["."]`` puts the repository
root first, which keeps the real one winning).
"""
