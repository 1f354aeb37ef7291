"""Fiatprint: the dollar price of bitcoin from your own node's transactions.

The pure core lives in :mod:`oracle.decode`, :mod:`oracle.filter` and
:mod:`oracle.estimate`; the actors in :mod:`oracle.intake`,
:mod:`oracle.pipeline`, :mod:`oracle.window` and :mod:`oracle.fanout`; the
assembled service in :mod:`oracle.service`. Import from those modules (the
package re-exports only a few names, and none that would shadow a module).
"""

from .decode import Block, DecodeError, Tx, parse_block, parse_tx
from .estimate import Estimate, Histogram, Params
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
    "parse_block",
    "parse_tx",
]
