"""Fiatprint: the dollar price of bitcoin from your own node's transactions."""

from .decode import Block, DecodeError, Tx, parse_block, parse_tx
from .estimate import Estimate, Histogram, Params, estimate
from .filter import Reject, TxFilter

__all__ = [
    "Block",
    "DecodeError",
    "Estimate",
    "Histogram",
    "Params",
    "Reject",
    "Tx",
    "TxFilter",
    "estimate",
    "parse_block",
    "parse_tx",
]
