"""Errors of the ACME adapter: one line each, what went wrong and what to check."""

from __future__ import annotations


class AcmeError(Exception):
    """An ACME operation failed (the CA refused, timed out, or could not be reached)."""


class DnsError(AcmeError):
    """The DNS provider could not publish or remove a challenge record."""
