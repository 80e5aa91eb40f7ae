"""Sweep-side commands (sweep, ablate, report, defaults); filled in by the engine."""
from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    return None
