"""Attacks on pydstack, one test each; docs/threat-model.md names them."""
