"""What `up` lets its QEMU guests reach: the services it runs, nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest

from pydstack.adapters.firewall import HostServices
from pydstack.adapters.nats import StoreError
from pydstack.controlplane import ControlPlane, DataDir, UpOptions


def test_up_lists_its_kms_replicas_and_its_gateways_registration_and_wireguard(
    tmp_path: Path,
) -> None:
    plane = ControlPlane(DataDir(tmp_path), UpOptions(kms_urls=("https://10.0.0.5:9200",)))
    plane.kms_url = "https://127.0.0.1:9100"
    plane.gateway = {"gateway_registration_url": "https://127.0.0.1:8011",
                     "gateway_wireguard_port": 51820}  # fmt: skip
    services = plane._guest_services()
    assert (services.kms, services.gateway_registration, services.wireguard) == (
        (9100, 9200), (8011,), (51820,),
    )  # fmt: skip
    assert services.registry == ()


def test_up_without_kms_or_gateway_lists_nothing(tmp_path: Path) -> None:
    services = ControlPlane(DataDir(tmp_path), UpOptions())._guest_services()
    assert services == HostServices(dns=services.dns)


def test_a_malformed_kms_url_stops_up_with_one_line(tmp_path: Path) -> None:
    plane = ControlPlane(DataDir(tmp_path), UpOptions(kms_urls=("https://kms:port",)))
    with pytest.raises(StoreError, match=r"guest egress rules: .*check --kms-url"):
        plane._guest_services()
