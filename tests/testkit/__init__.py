"""Test support shared by the test packages: token issuing for the real auth interceptor
(:mod:`testkit.tokens`), the tiny base model (:mod:`testkit.models`) and throw-away
PostgreSQL databases (:mod:`testkit.postgres`).

It holds helpers, not fixtures: each test package keeps its fixtures (their scope and
whether they are autouse differ) in its own conftest, which calls these. Importable as
``testkit`` because pyproject's pytest settings put ``tests/`` on ``pythonpath``.
"""
