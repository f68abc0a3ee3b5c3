"""dstack's JavaScript SDK (@phala/dstack-sdk 0.5, run with node) on our agent's sockets: every
call, each answer checked with pydstack's verifiers (the booted-CVM run: tests/cvm)."""

from __future__ import annotations

from .conftest import APP_ID, Guest
from .jssdk import check_js_results, run_js_sdk
from .pysdk import run_py_sdk
from .test_sdk import _verify
from .tlscheck import option_matrix


async def test_every_js_sdk_call_on_the_agent_sockets(guest: Guest) -> None:
    """DstackClient (getTlsKey with its defaults and every option combination included) and
    the deprecated TappdClient answer as dstack's agent does; quotes verify, chains hold."""
    options = option_matrix(guest.now)
    r = await run_js_sdk(guest.dstack_sock, guest.tappd_sock, options)
    check_js_results(
        r, options, verify=lambda q, log: _verify(guest, q, log), app_id=APP_ID,
        kms_root=guest.keys.kms_root_public, chain_len=2, tappd=True,
    )  # fmt: skip


async def test_every_python_sdk_call_passes_the_same_checks(guest: Guest) -> None:
    """dstack-sdk (Python) through the same sweep and checks as the JavaScript SDK."""
    options = option_matrix(guest.now)
    r = await run_py_sdk(guest.dstack_sock, guest.tappd_sock, options)
    check_js_results(
        r, options, verify=lambda q, log: _verify(guest, q, log), app_id=APP_ID,
        kms_root=guest.keys.kms_root_public, chain_len=2, tappd=True,
    )  # fmt: skip
