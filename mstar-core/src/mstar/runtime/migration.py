"""Moving a request's sequences of one KV node between workers (per-walk placement).

The source exports every sequence (each label and child: K/V, the history that rebuilds
it, the sampling state), hands the tensors to the transport addressed to the destination
and forgets the request; the destination imports them before the next walk starts there.
Noise and sampling need no state beyond the request's seed (they are keyed).
"""

from __future__ import annotations

from mstar.communication import messages as msg
from mstar.communication.transport import Transport
from mstar.engine.kv_cache import SeqExport
from mstar.engine.kv_engine import KVEngine, SeqMigration
from mstar.engine.sequence import Chunk, SeqState
from mstar.model.forward import Segment, SeqKey


def to_wire(engine: KVEngine, m: SeqMigration, transport: Transport,
            dest: str) -> msg.SeqTransfer:
    """One exported sequence as a message, its tensors addressed to `dest`."""
    def put(t):
        return transport.put(t, m.state.key.request_id, owner=dest)

    state = m.state
    history = None
    if state.history:
        c = Chunk.concat(state.history, fill=engine.default_extra)
        history = msg.ChunkMsg(put(c.input_ids), put(c.positions),
                               [(s.length, s.kind) for s in c.segments],
                               {k: put(v) for k, v in c.token_extras.items()},
                               {k: put(v) for k, v in c.seq_extras.items()})
    return msg.SeqTransfer(state.key.label, state.key.child,
                           put(m.kv.kv) if m.kv is not None else None, history,
                           state.next_position, list(state.appended_ids), list(state.sampled))


def export_sequences(engine: KVEngine, request_id: str, transport: Transport,
                     dest: str) -> list[msg.SeqTransfer]:
    """Every sequence of the request, then forget it here."""
    out = [to_wire(engine, m, transport, dest) for m in engine.export_request(request_id)]
    engine.release(request_id)
    return out


def import_sequences(engine: KVEngine, request_id: str, seqs: list[msg.SeqTransfer],
                     transport: Transport) -> None:
    def take(h: msg.Handle):
        t = transport.get(h)
        transport.free(h)
        return t

    migrations = []
    for s in seqs:
        history = []
        if s.history is not None:
            h = s.history
            history.append(Chunk(take(h.input_ids), take(h.positions),
                                 [Segment(n, kind) for n, kind in h.segments],
                                 {k: take(v) for k, v in h.token_extras.items()},
                                 {k: take(v) for k, v in h.seq_extras.items()}))
        kv = take(s.kv) if s.kv is not None else None
        state = SeqState(SeqKey(request_id, engine.node, s.label, s.child), history=history,
                         next_position=s.next_position, appended_ids=list(s.appended_ids),
                         sampled=[tuple(x) for x in s.sampled])
        migrations.append(SeqMigration(state, SeqExport(int(kv.shape[2]), kv)
                                       if kv is not None else None))
    engine.import_request(migrations)
