"""Every Redis key name, built in one place.

All keys of one sale share the hash tag ``{sale_id}`` so that a sale lives in one Cluster slot
and every Lua script touches one slot only. Sale ids and skus are limited to ``[A-Za-z0-9_-]``,
so they can never contain the tag braces or the ``:`` separator.

A sale with a sharded item has extra slots, tagged ``{sale_id~x}`` (``~`` is never in an id):
the per-sale methods below take a *slot* (the sale id itself, or one of those tags) wherever
the key can live in either. ``shards.py`` says which slot a user's reservations go to.
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "persister"  # consumer group on every sale's event stream: into Postgres
WEBHOOKS = "webhooks"  # the other group on every sale's event stream: into webhook deliveries (dispatch.py)
GROUPS = f"{GROUP},{WEBHOOKS}"  # both, as the scripts that make a stream take them


WORKER_TTL_MS = 10_000  # a persister silent this long is not counted alive


@dataclass(frozen=True)
class Keys:
    prefix: str = "fs"

    # ZSET sale_id -> created ms. Every sale ever created; lives as long as the data.
    @property
    def sales(self) -> str:
        return f"{self.prefix}:sales"

    # ZSET sale_id -> ms after which the sale can make no new event by itself (ends_ms + hold_ms;
    # an ops action raises it). What the sweeper and the persister go over, so that their work
    # follows the sales still going, not every sale ever made. The persister removes a sale once
    # that time has passed and it has no hold and no unpersisted event (lua/retire.lua).
    @property
    def active(self) -> str:
        return f"{self.prefix}:active"

    # STRING, PX ~1 s: whoever holds it runs the expiry sweep for this tick.
    @property
    def sweeper_lock(self) -> str:
        return f"{self.prefix}:sweeper:lock"

    # STRING, PX 2 s: the persister whose consumer name it holds runs the live audit (audit.py).
    @property
    def audit_lock(self) -> str:
        return f"{self.prefix}:audit:lock"

    # ZSET: persister consumer name -> its last heartbeat (unix ms), refreshed every loop; removed
    # on a clean stop, and entries older than WORKER_TTL_MS are dropped by whoever counts them.
    # One key, counted in O(log N): never a SCAN over the keyspace, which grows with every hold.
    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    # STRING, PX ~1 s: whoever holds it runs the waiting rooms' admission tick (waiting.py).
    @property
    def queue_lock(self) -> str:
        return f"{self.prefix}:queue:lock"

    # PUB/SUB channel (not a key: nothing is stored). Every script that can make a refused
    # reservation succeed (units back from a cancel, an expiry or a restock; a state or window
    # change) publishes the sale id here in the same atomic step, and every API process drops
    # what it remembered of that sale's refusals (verdicts.py).
    @property
    def changes(self) -> str:
        return f"{self.prefix}:changes"

    def _sale(self, sale_id: str) -> str:
        return f"{self.prefix}:{{{sale_id}}}"

    # HASH: state, window, hold length, the sale document (JSON), skus, created_ms, changed_ms
    # (time of the last change, the at_ms of its event), rev (bumped by every change to the
    # document or window; updates compare it), audit (JSON list of the differences the live audit
    # last found, audit.py), ended_told (set once the webhooks' sale.ended is in their outbox,
    # dispatch.py: the sale is not retired before). Lives with the sale.
    def sale(self, sale_id: str) -> str:
        return f"{self._sale(sale_id)}:sale"

    # HASH in an extra slot: the sale's state, window and hold length as the sale hash has them
    # (copied there by lua/shard_sync.lua, rev by rev), and the skus sharded into it.
    # reserve.lua reads it as the sale hash. Lives with the sale.
    # STRING, PX 30 s: a create of a sale with sharded items in progress (its extra slots come
    # first), so that two creates of one id never write each other's slots.
    def creating(self, sale_id: str) -> str:
        return f"{self._sale(sale_id)}:creating"

    # HASH per item: stock_total, available, held, confirmed, cancelled, expired (units),
    # reservations, attempts, rej:<code> counters, per_user_limit; in a shard, also in_flight
    # (units given to another shard that has not been told it has them yet). Lives with the sale.
    def item(self, sale_id: str, sku: str) -> str:
        return f"{self._sale(sale_id)}:item:{sku}"

    # HASH per item: user_id -> units held + confirmed. Lives with the sale.
    def users(self, sale_id: str, sku: str) -> str:
        return f"{self._sale(sale_id)}:users:{sku}"

    # ZSET per item: rid -> expires ms of each live hold; the sweeper's due-time index.
    def holds(self, sale_id: str, sku: str) -> str:
        return f"{self._sale(sale_id)}:holds:{sku}"

    # HASH per item: client ip (IPv4, or an IPv6 /64) -> units held + confirmed (per_ip_limit).
    def ips(self, slot: str, sku: str) -> str:
        return f"{self._sale(slot)}:ips:{sku}"

    # HASH per item: client device -> units held + confirmed (per_device_limit).
    def devices(self, slot: str, sku: str) -> str:
        return f"{self._sale(slot)}:devices:{sku}"

    # HASH per item, in the slot a client's budget of a sharded item is counted in (budgets.py):
    # rid -> json {qty, ip, device}, the units charged to that client for the hold, until given
    # back (refused, cancelled, expired: lua/budget_give.lua). Lives with the sale.
    def charges(self, slot: str, sku: str) -> str:
        return f"{self._sale(slot)}:charges:{sku}"

    # ZSET per item, beside charges: rid -> ms charged, until the API saw the hold made or refused;
    # the sweeper settles one left longer (a process died between charge and hold).
    def pending(self, slot: str, sku: str) -> str:
        return f"{self._sale(slot)}:pending:{sku}"

    # HASH rid -> sku, in a sharded item's shard: released holds whose budget charges wait to be
    # given back in the slots that counted them (lua/settle.lua; drained by budgets.py).
    def refunds(self, slot: str) -> str:
        return f"{self._sale(slot)}:refunds"

    # STRING counter, PX 1 s: attempts from one client ip on one sale in the current second.
    def ip_rate(self, slot: str, ip: str) -> str:
        return f"{self._sale(slot)}:iprate:{ip}"

    # HASH per reservation: rid, sku, user, qty, status, created/expires/final ms. Lives with the sale.
    def reservation(self, sale_id: str, rid: str) -> str:
        return f"{self._sale(sale_id)}:res:{rid}"

    # HASH per cart: user, rids (its lines' reservation ids, comma-joined), created_ms, expires_ms.
    # Lives with the sale (carts.py).
    def cart(self, sale_id: str, cart_id: str) -> str:
        return f"{self._sale(sale_id)}:cart:{cart_id}"

    # STREAM of reserve/confirm/cancel/expire/sale events; group GROUP feeds Postgres.
    # Trimmed by the persister below the oldest entry not yet acknowledged.
    def events(self, sale_id: str) -> str:
        return f"{self._sale(sale_id)}:events"

    # STREAM of entries the persister gave up on, with the reason. Kept for ops.
    def dead(self, sale_id: str) -> str:
        return f"{self._sale(sale_id)}:dead"

    # HASH entry id -> times Postgres refused that entry's data (DataError, constraint). Only
    # refusals count toward dead-lettering, never deliveries: an outage or a crash-looping worker
    # must not turn an acknowledged order into a dead letter. Field deleted once the entry is done.
    def refused(self, sale_id: str) -> str:
        return f"{self._sale(sale_id)}:refused"

    # STRING "rid|fingerprint": scoped to (sale, user, key); lives with the sale, no TTL.
    def idempotency(self, sale_id: str, user_id: str, key: str) -> str:
        # The user's length goes first so that ("a:b", "c") and ("a", "b:c") never collide.
        return f"{self._sale(sale_id)}:idem:{len(user_id)}:{user_id}:{key}"

    # ZSET: rid -> created ms of every reservation one user made in the sale, for the user's
    # list (GET /v1/sales/{id}/reservations?user_id=). Lives with the sale.
    def user_reservations(self, sale_id: str, user_id: str) -> str:
        return f"{self._sale(sale_id)}:mine:{len(user_id)}:{user_id}"

    # STRING counter, PX 1 s: attempts of one user on one sale in the current second.
    def rate(self, sale_id: str, user_id: str) -> str:
        return f"{self._sale(sale_id)}:rate:{user_id}"

    # HASH move id -> "sku|slot|units|ms": stock this shard gave another one (lua/shard_give.lua),
    # until the sweeper sees it arrived and settles it here (lua/shard_done.lua). Lives with the sale.
    def moves(self, slot: str) -> str:
        return f"{self._sale(slot)}:moves"

    # SET of the move ids this shard was given: taking one twice (a retry, the sweeper's repair)
    # adds its units once. Lives with the sale.
    def received(self, slot: str) -> str:
        return f"{self._sale(slot)}:received"

    # The waiting room of a sale (waiting.py), in the sale's slot, all living with the sale:
    # HASH admit_per_s, abandon_ms, ttl_ms (its settings; admit_per_s changed live by ops), seq
    # (places given after the start), joined, admitted, expired (counts), tick_ms and carry (the
    # last tick and what was left of its allowance), closed (the reason, once closed: final).
    def queue_state(self, sale_id: str) -> str:
        return f"{self._sale(sale_id)}:queue:state"

    # ZSET ticket -> place, of the tickets waiting: admission goes in this order.
    def queue(self, sale_id: str) -> str:
        return f"{self._sale(sale_id)}:queue"

    # ZSET ticket -> ms of its last poll, of the tickets waiting: the tick expires the oldest.
    def queue_polls(self, sale_id: str) -> str:
        return f"{self._sale(sale_id)}:queue:polls"

    # HASH user_id -> their ticket.
    def queue_users(self, sale_id: str) -> str:
        return f"{self._sale(sale_id)}:queue:users"

    # HASH per ticket: user, status (waiting, admitted, closed, expired), place, joined_ms,
    # admitted_ms or expired_ms, reason (when closed).
    def ticket(self, sale_id: str, ticket: str) -> str:
        return f"{self._sale(sale_id)}:ticket:{ticket}"

    def sale_pattern(self, sale_id: str) -> str:
        return f"{self._sale(sale_id)}:*"
