"""Task functions for tests/test_map.py's classic-API maps."""


def inverse(x: int) -> float:
    return 1 / x
