"""Backends carry out the scheduler's actions: ``local`` (forked processes) and ``rq`` (Redis + RQ)."""
