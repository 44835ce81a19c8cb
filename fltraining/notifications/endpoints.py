"""Which message endpoints the service may call (a guard against server-side request forgery)."""

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

from fltraining.errors import InvalidInput

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def refused_address(address: IPAddress, allow_loopback: bool) -> str | None:
    """Why the service must not call this address, or None when it may."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_unspecified or address.is_multicast or address.is_reserved:
        return "an unspecified, multicast or reserved address"
    if (address.is_loopback or address.is_link_local) and not allow_loopback:
        # Link-local includes cloud metadata services (169.254.169.254).
        return "a loopback or link-local address"
    return None


def check_endpoint_url(url: str, allow_loopback: bool) -> str:
    """Validate a message endpoint's form; IP literals are checked now, names when resolved."""
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"}:
        raise InvalidInput("message_endpoint must be an http or https URL.")
    if not parts.hostname or parts.username or parts.password:
        raise InvalidInput("message_endpoint needs a host and no credentials in the URL.")
    try:
        literal = ipaddress.ip_address(parts.hostname)
    except ValueError:
        return url
    if reason := refused_address(literal, allow_loopback):
        raise InvalidInput(f"message_endpoint points at {reason}.")
    return url


async def resolve_endpoint(url: str, allow_loopback: bool) -> list[IPAddress]:
    """Resolve the endpoint's host; refuse it if any address is one the service must not call."""
    parts = urlsplit(check_endpoint_url(url, allow_loopback))
    assert parts.hostname is not None
    try:
        # An IP literal was checked above and names its own address: no resolver call (a thread hand-off
        # per receiver and notification).
        return [ipaddress.ip_address(parts.hostname)]
    except ValueError:
        pass
    port = parts.port or (443 if parts.scheme == "https" else 80)
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise InvalidInput(f"message_endpoint host does not resolve: {parts.hostname}") from error
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    for address in addresses:
        # Every address is checked: a name resolving to one public and one private address
        # would otherwise let the connection land on the private one.
        if reason := refused_address(address, allow_loopback):
            raise InvalidInput(f"message_endpoint resolves to {reason}.")
    return addresses
