"""City -> (latitude, longitude) for the alert map.

The producer's generator owns the list of cities it emits (``producer.generator.CITIES``); the
dashboard uses that table whenever the producer package is importable, and a small table of its
own otherwise (e.g. a dashboard-only image). Cities in neither table are counted, not placed.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["coordinates"]

_FALLBACK: Mapping[str, tuple[float, float]] = {
    "Paris": (48.8566, 2.3522), "Lyon": (45.7640, 4.8357), "Marseille": (43.2965, 5.3698),
    "Berlin": (52.5200, 13.4050), "Munich": (48.1351, 11.5820), "Madrid": (40.4168, -3.7038),
    "Barcelona": (41.3874, 2.1686), "Rome": (41.9028, 12.4964), "Milan": (45.4642, 9.1900),
    "Amsterdam": (52.3676, 4.9041), "Brussels": (50.8503, 4.3517), "Vienna": (48.2082, 16.3738),
    "Zurich": (47.3769, 8.5417), "London": (51.5072, -0.1276), "Dublin": (53.3498, -6.2603),
    "Lisbon": (38.7223, -9.1393), "Stockholm": (59.3293, 18.0686),
    "Copenhagen": (55.6761, 12.5683), "Oslo": (59.9139, 10.7522), "Warsaw": (52.2297, 21.0122),
    "Prague": (50.0755, 14.4378), "Athens": (37.9838, 23.7275),
}

try:
    from producer.generator import CITIES as _GENERATOR_CITIES
except ImportError:
    _GENERATOR_CITIES = {}

CITY_COORDINATES: Mapping[str, tuple[float, float]] = {**_FALLBACK, **_GENERATOR_CITIES}


def coordinates(city: str) -> tuple[float, float] | None:
    return CITY_COORDINATES.get(city)
