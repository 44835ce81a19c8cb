"""The message-endpoint guard: http(s) only, no loopback or link-local targets unless allowed."""

import pytest

from fltraining.errors import InvalidInput
from fltraining.notifications.endpoints import check_endpoint_url, resolve_endpoint

# Pure functions: no service and no store, so the blob store tier cannot change them (run once).
pytestmark = pytest.mark.store_independent

REFUSED = [
    "ftp://example.org/x",
    "file:///etc/passwd",
    "http://",
    "http://user:secret@example.org/",
    "http://127.0.0.1:8101/",
    "http://127.1.2.3/",
    "http://[::1]/",
    "http://169.254.169.254/latest/meta-data/",
    "http://[fe80::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://0.0.0.0/",
    "http://224.0.0.1/",
]


@pytest.mark.parametrize("url", REFUSED)
def test_refused_endpoints(url: str) -> None:
    with pytest.raises(InvalidInput):
        check_endpoint_url(url, allow_loopback=False)


@pytest.mark.parametrize("url", ["http://10.1.2.3:8101/", "https://client.example.org/notify", "http://[2001:db8::1]/"])
def test_accepted_endpoints(url: str) -> None:
    assert check_endpoint_url(url, allow_loopback=False) == url


def test_loopback_is_allowed_when_the_setting_says_so() -> None:
    assert check_endpoint_url("http://127.0.0.1:8101/", allow_loopback=True)
    with pytest.raises(InvalidInput):  # never a wildcard address, even then
        check_endpoint_url("http://0.0.0.0:8101/", allow_loopback=True)


async def test_names_are_checked_after_resolution() -> None:
    with pytest.raises(InvalidInput, match="loopback"):
        await resolve_endpoint("http://localhost:8101/", allow_loopback=False)
    addresses = await resolve_endpoint("http://localhost:8101/", allow_loopback=True)
    assert addresses and all(address.is_loopback for address in addresses)


async def test_unresolvable_names_are_refused() -> None:
    with pytest.raises(InvalidInput, match="does not resolve"):
        await resolve_endpoint("http://no-such-host.invalid/", allow_loopback=False)


async def test_an_ip_literal_is_its_own_address_and_still_checked() -> None:
    assert [str(address) for address in await resolve_endpoint("http://10.1.2.3:8101/", allow_loopback=False)] == [
        "10.1.2.3"]
    assert [str(address) for address in await resolve_endpoint("http://[2001:db8::1]/", allow_loopback=False)] == [
        "2001:db8::1"]
    with pytest.raises(InvalidInput, match="loopback"):
        await resolve_endpoint("http://[::ffff:127.0.0.1]:8101/", allow_loopback=False)
