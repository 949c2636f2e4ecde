"""Geography, latency and device/fleet seed data for the broker; everything here is pure and cached."""

from regions.catalog import Device, SiteSeed, load_devices, load_fleet
from regions.geo import City, Cluster, Geography, Hub, load_geography
from regions.latency import LatencyModel, great_circle_km

__all__ = [
    "City",
    "Cluster",
    "Device",
    "Geography",
    "Hub",
    "LatencyModel",
    "SiteSeed",
    "great_circle_km",
    "load_devices",
    "load_fleet",
    "load_geography",
]
