"""Edge versus cloud money: cost per query, per 1k queries, and the volume where one becomes cheaper."""

from __future__ import annotations


def edge_cost_per_query(e2e_s: float, power_w: float | None, kwh_price: float | None) -> float | None:
    """Marginal energy cost of one on-device answer (None without a power figure and a price)."""
    if power_w is None or kwh_price is None:
        return None
    return power_w * e2e_s / 3.6e6 * kwh_price


def break_even_queries(device_cost: float | None, edge_per_query: float | None, cloud_per_query: float) -> float | None:
    """Queries after which owning the device is cheaper than paying the API (None when it never is)."""
    if device_cost is None:
        return None
    saving = cloud_per_query - (edge_per_query or 0.0)
    return device_cost / saving if saving > 0 else None


def monthly_costs(volumes: list[float], cloud_per_query: float, edge_per_query: float | None,
                  device_cost: float | None, amortize_months: int) -> dict:
    """Cost per month at each volume, cloud and edge (device amortized + energy)."""
    fixed = (device_cost or 0.0) / amortize_months
    return {"volumes": volumes,
            "cloud": [v * cloud_per_query for v in volumes],
            "edge": [fixed + v * (edge_per_query or 0.0) for v in volumes]}
