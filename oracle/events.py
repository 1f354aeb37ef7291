"""Messages that the actors pass to each other over memory channels.

Every message is an immutable ``attrs`` value. Times are Unix seconds (float)
taken from the wall clock when the message was made; actors that need
monotonic time for timers use ``trio.current_time()`` separately.

Flow (each arrow a bounded ``trio`` memory channel)::

    intake --FeedMessage--> decoder --WindowEvent--> window --Update--> fan-out
                                                ^
                   baseline (RPC) --WindowEvent-'
"""

from __future__ import annotations

import attrs

from .decode import Block, Tx
from .estimate import Estimate
from .filter import Reject

# ---------------------------------------------------------------- intake -> decoder


@attrs.frozen
class RawTx:
    """A ``rawtx`` body as published, not yet decoded."""

    body: bytes
    received: float


@attrs.frozen
class SequenceEvent:
    """A ``sequence`` notification: label is one of ``C D A R``.

    ``hash`` is in internal byte order: Core publishes it in display order
    (as RPC shows it) and the intake reverses it. ``mempool_seq`` is set for
    ``A`` and ``R``.
    """

    hash: bytes
    label: str
    mempool_seq: int | None
    received: float


@attrs.frozen
class HashBlock:
    """A ``hashblock`` notification (published in display order, reversed by
    the intake)."""

    hash: bytes  # internal byte order
    received: float


@attrs.frozen
class FeedTrouble:
    """The feed lost messages (``kind="gap"``), the node restarted
    (``kind="restart"``) or went silent and was reconnected (``kind="stale"``).
    Consumers must not trust their window afterwards and should resynchronise.
    """

    kind: str
    topic: str
    detail: str
    received: float
    #: Messages the publisher dropped (``kind="gap"``), else 0.
    lost: int = 0


FeedMessage = RawTx | SequenceEvent | HashBlock | FeedTrouble

# ---------------------------------------------------------------- decoder -> window


@attrs.frozen
class TxSeen:
    """A decoded transaction from the feed (mempool arrival or block repeat).

    The decoder applies the method's rules that need no window state:
    ``reject`` is the first of them the transaction breaks (never
    ``Reject.SAME_WINDOW``, which only the window can judge) and ``kept`` the
    ``(vout, sats)`` of its outputs within the amount bounds when it broke
    none. With ``checked=False`` (a hand-made event) the window judges the
    transaction itself.
    """

    tx: Tx
    received: float
    reject: Reject | None = None
    kept: tuple[tuple[int, int], ...] = ()
    checked: bool = False


@attrs.frozen
class TxAnnounced:
    """``sequence A``: the node accepted ``txid`` into its mempool.

    Lets the window tell a mempool transaction from one it first sees in a
    block announcement.
    """

    txid: bytes  # internal byte order
    mempool_seq: int | None
    received: float


@attrs.frozen
class TxRemoved:
    """Removed from the mempool for a reason other than being mined."""

    txid: bytes  # internal byte order
    received: float


@attrs.frozen
class BlockConnected:
    """A block joined the best chain.

    ``block`` is the decoded block when it is known (fetched over RPC or read
    from a file); from ZMQ alone only the hash is known, and the window then
    confirms the transactions whose ``rawtx`` repeats preceded the ``C``.
    ``height`` is None when unknown.
    """

    hash: bytes  # internal byte order
    block: Block | None
    height: int | None
    received: float


@attrs.frozen
class BlockDisconnected:
    """A block left the best chain; its transactions return to the mempool."""

    hash: bytes  # internal byte order
    received: float


@attrs.frozen
class Resync:
    """Forget the window and rebuild it (after a gap or a node restart)."""

    reason: str
    received: float


WindowEvent = (
    TxSeen
    | TxAnnounced
    | TxRemoved
    | BlockConnected
    | BlockDisconnected
    | Resync
    | FeedTrouble
)

# ---------------------------------------------------------------- window -> fan-out


@attrs.frozen
class Point:
    """One per-output implied price point for the live clouds."""

    price: float
    sats: int
    time: float
    txid: str  # display hex
    confirmed: bool


@attrs.frozen
class EstimateUpdate:
    estimate: Estimate
    time: float
    window_outputs: int
    confirmed_outputs: int
    mempool_outputs: int


@attrs.frozen
class PointsBatch:
    points: tuple[Point, ...]


@attrs.frozen
class BlockEvent:
    """A block connected to or disconnected from the window's chain.

    With RPC, a block is usually reported twice as ``connected``: first from
    ``sequence C`` (``height`` None, ``confirmed_txids`` inferred from ZMQ),
    then from the full block (height known, exact count). Consumers should
    let the later event replace the earlier one with the same ``hash``.
    """

    hash: str  # display hex
    height: int | None
    time: float
    kind: str  # "connected" or "disconnected"
    confirmed_txids: int


@attrs.frozen
class StatusChange:
    component: str
    status: str
    detail: str
    time: float


Update = EstimateUpdate | PointsBatch | BlockEvent | StatusChange
