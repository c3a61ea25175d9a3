"""``--target/--rank/--alpha``: one LoRA rule written on the command line instead of an adapter or a rules file
(``rewrite``: LoRA-ready slots; ``analyse``: the cost of such an adapter)."""

from __future__ import annotations

import argparse

from lorapass.errors import RuleError


def add_arguments(parser: argparse.ArgumentParser, title: str, rank_help: str) -> argparse._ArgumentGroup:
    """Add the shorthand options to ``parser`` in a group named ``title``; the group, for command-specific extras."""
    group = parser.add_argument_group(title)
    group.add_argument("--target", nargs="+", metavar="MODULE", help="target_modules suffixes, or all-linear")
    group.add_argument("--rank", type=int, default=8, help=rank_help)
    group.add_argument("--alpha", type=float, help="lora_alpha (default: the rank)")
    return group


def rule(args: argparse.Namespace, name: str, strategy: str, use_dora: bool = False):
    """The rule ``--target/--rank/--alpha`` describe, or None without ``--target``; it replaces an adapter."""
    if not args.target:
        return None
    if args.adapter or args.rules:
        raise RuleError("--target describes the LoRA itself; it does not combine with --adapter or --rules")
    from lorapass.rules import MAX_RANK, LoraRule, _validated

    if not 1 <= args.rank <= MAX_RANK:
        raise RuleError(f"--rank {args.rank}: the rank must be 1..{MAX_RANK}")
    target = args.target[0] if len(args.target) == 1 and args.target[0].lower() == "all-linear" else args.target
    alpha = args.rank if args.alpha is None else args.alpha
    return _validated(LoraRule, dict(name=name, target_modules=target, r=args.rank, strategy=strategy, lora_alpha=alpha,
                                     use_dora=use_dora), "--target/--rank/--alpha")
