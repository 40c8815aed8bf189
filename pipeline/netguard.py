"""Never connect to an address that is not public (the fetch stage's guard against SSRF).

A page may point its images anywhere: at the cloud metadata server (169.254.169.254), at a
database on the private network, at localhost. Before any connection the fetch stage checks the
address it is about to use: `address_refusal` says why an address is refused, `GuardedResolver`
resolves host names for aiohttp and hands it only the addresses that passed, so the connection goes
to the address that was checked (no second lookup). Host names that are IP literals never reach a
resolver; the fetch stage checks those with `address_refusal` itself, on every redirect too.

Ranges named with `--fetch-allow-private CIDR` are let through (tests and benchmarks allow
127.0.0.1/32); by default none are.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence

from aiohttp.abc import AbstractResolver, ResolveResult

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

CARRIER_GRADE_NAT = ipaddress.IPv4Network("100.64.0.0/10")
# NAT64 (RFC 6052 well-known prefix and RFC 8215 local-use prefix): the last 32 bits are an IPv4
# address that a NAT64 gateway would connect to.
NAT64_PREFIXES = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))


def parse_allowed_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """The networks of `--fetch-allow-private`; a ValueError names a value that is not a CIDR."""
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError as error:
            raise ValueError(
                f"--fetch-allow-private {cidr!r} is not an address range: write it as a CIDR such "
                f"as 127.0.0.1/32 or 10.0.0.0/8 ({error})"
            ) from None
    return tuple(networks)


def address_refusal(address: str | IPAddress, allowed: Sequence[IPNetwork] = ()) -> str | None:
    """None if we may connect to `address`; else why not, e.g. "loopback address 127.0.0.1"."""
    if isinstance(address, str):
        try:
            address = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone index
        except ValueError:
            return f"{address!r} is not an IP address"
    if any(address in network for network in allowed if network.version == address.version):
        return None
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            refusal = address_refusal(embedded, allowed)
            return None if refusal is None else f"{refusal}, embedded in {address}"
    kind = _non_public_kind(address)
    return None if kind is None else f"{kind} address {address}"


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (IPv4-mapped, 6to4, NAT64), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if any(address in prefix for prefix in NAT64_PREFIXES):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _non_public_kind(address: IPAddress) -> str | None:
    # Order matters only for the message: the most specific name first.
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if isinstance(address, ipaddress.IPv4Address) and address in CARRIER_GRADE_NAT:
        return "carrier-grade NAT"
    if address.is_private:
        return "private"
    if address.is_reserved:
        return "reserved"
    if not address.is_global:
        return "non-global"
    return None


class ForbiddenAddress(OSError):
    """A host name that resolves only to addresses we may not connect to.

    An OSError, so that aiohttp reports it as a ClientConnectorDNSError whose `os_error` is this.
    """


class GuardedResolver(AbstractResolver):
    """Resolves with `inner` and returns only the addresses that pass `address_refusal`."""

    def __init__(self, inner: AbstractResolver, allowed: Sequence[IPNetwork] = ()) -> None:
        self._inner = inner
        self._allowed = tuple(allowed)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        kept = []
        refusals = []
        for result in results:
            refusal = address_refusal(result["host"], self._allowed)
            if refusal is None:
                kept.append(result)
            else:
                refusals.append(refusal)
        if not kept:
            raise ForbiddenAddress(f"{host} resolves to no public address ({'; '.join(refusals)})")
        return kept

    async def close(self) -> None:
        await self._inner.close()
