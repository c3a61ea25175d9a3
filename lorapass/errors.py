"""Typed errors: every failure a user can cause names the file, rule, site or tensor at fault."""

from __future__ import annotations


class LorapassError(Exception):
    """Base of every error lorapass raises on bad input (the CLI exits 2 on these)."""


class ModelError(LorapassError):
    """The model file is missing, corrupt, or unsafe (e.g. external data outside its folder)."""


class AdapterError(LorapassError):
    """The adapter directory is missing files, has unreadable tensors, or keys that fit no site."""


class RuleError(LorapassError):
    """A rule is invalid or matches nothing."""


class ShapeMismatchError(AdapterError):
    """An adapter tensor's shape does not fit the site it targets."""


class UnsupportedError(LorapassError):
    """A PEFT feature or graph pattern lorapass does not implement yet (never silently ignored)."""


class SpecError(LorapassError):
    """A hardware spec or model config file is invalid."""


class LorapassWarning(UserWarning):
    """Something lorapass ignored on request (e.g. an unknown adapter_config.json key); the CLI prints it."""
