"""Geography, latency and device/fleet seed data for the broker; everything here is pure and cached."""

from regions.catalog import Device, SiteSeed, load_devices, load_fleet
from regions.geo import City, Cluster, Geography, Hub, load_geography
from regions.latency import LatencyModel, great_circle_km
from regions.transfer import TransferModel, hub_of_place, load_transfer, nearest_hub, transfer_hours

__all__ = [
    "City",
    "Cluster",
    "Device",
    "Geography",
    "Hub",
    "LatencyModel",
    "SiteSeed",
    "TransferModel",
    "great_circle_km",
    "hub_of_place",
    "load_devices",
    "load_fleet",
    "load_geography",
    "load_transfer",
    "nearest_hub",
    "transfer_hours",
]
