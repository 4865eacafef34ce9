"""An index of eviction candidates that answers ``EvictionPolicy.choose`` without a full scan.

``choose`` over a free queue ranks every candidate: ``(pinned, pin order, value)``, ties kept in
queue order. The block pool, the tier manager's copy-out candidates and the host tier call it on
every allocation that evicts, so with tens of thousands of cached blocks the scan dominated
a long simulation. This index returns exactly the same entries in the same order, in time
proportional to the number of distinct last-access times among the candidates (a request's
blocks are let go together, so that is about the number of cached conversations), not to the
number of candidates:

* candidates are grouped by ``last_access``; within a group every entry has the same idle
  time, so both policies rank it by a static per-entry cost (the chunk's recompute cost for
  the cost-aware policy, nothing for LRU) and then by queue order; a group is sorted when
  ``choose`` next needs it, and removed entries are skipped there (lazily);
* ``choose`` merges the groups' heads, computing each head's value exactly as the policy does;
* entries with a pin (``pin_until``) wait in a side heap until the pin expires; entries still
  pinned rank after all others, as in the policy, and are ranked by a scan (pins are capped).

The owner reports every change of membership (``add`` / ``remove``, with the entry's position
in queue order) and of an entry's ranking fields while it is a candidate (``update``). If two
distinct costs are so close that dividing them by the same idle time could round them to one
value (where the policy would fall back to queue order), ``choose`` returns None and the owner
runs the policy's scan instead: the answer is always the policy's.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import weakref
from collections.abc import Iterable
from typing import Generic, TypeVar

from cadenza.core.eviction import (
    CHUNK_TOKENS,
    CostAwareEviction,
    Evictable,
    EvictionPolicy,
    LRUEviction,
)

E = TypeVar("E", bound=Evictable)

# Two distinct chunk costs closer than this (relatively) could tie once divided by an idle
# time; past that bound, division keeps their order and the grouped ranking is exact.
_MIN_COST_GAP = 1e-12
_IDLE_FLOOR = 1e-3  # as in CostAwareEviction.value

# An entry as indexed: (cost, seq, entry, last_access, pin_until), ranked within its group by
# (cost, seq). Alive while the index's ``_live`` maps the entry to this very tuple. Items are
# compared as plain tuples (no key function: sorting and bisecting stay in C). That never
# reaches the entry itself: a seq names one entry only (queue places are never reused), so two
# items tie on (cost, seq) only if they are the same entry's (a live one and a removed one of
# the same group), and then the entry compares equal to itself and the floats decide.
_Item = tuple[float, int, E, float, float]


def supports(policy: EvictionPolicy) -> bool:
    """Whether ``policy`` ranks as the index assumes (a subclass may rank otherwise)."""
    return type(policy) in (EvictionPolicy, LRUEviction, CostAwareEviction)


class _CostTable:
    """A cost-aware policy's chunk costs, memoised by an entry's end (position + tokens, the
    chunk being the one that ends at or after it), and whether every two distinct ones are far
    enough apart (``separated``)."""

    def __init__(self, policy: CostAwareEviction) -> None:
        self.cost = policy.cost
        self.by_tokens: dict[int, float] = {}
        self.distinct: list[float] = []
        self.separated = True

    def __call__(self, tokens: int) -> float:
        cost = self.by_tokens[tokens] = self.cost(-(-tokens // CHUNK_TOKENS) * CHUNK_TOKENS)
        distinct = self.distinct
        i = bisect.bisect_left(distinct, cost)
        if i < len(distinct) and distinct[i] == cost:
            return cost
        for j in (i - 1, i):
            if 0 <= j < len(distinct):
                other = distinct[j]
                if abs(cost - other) <= _MIN_COST_GAP * max(abs(cost), abs(other)):
                    self.separated = False
        distinct.insert(i, cost)
        return cost


_TABLES: weakref.WeakKeyDictionary[EvictionPolicy, _CostTable] = weakref.WeakKeyDictionary()


class _Group:
    """The grouped entries of one last-access time: ``items[start:]``, sorted by rank unless
    ``dirty`` (new groups fill unsorted), with removed entries among them. ``head_live``: the
    sorted group's ``items[start]`` is known to be live (``choose`` then skips no removed
    entries at its head, and reads no other entry of the group it does not take)."""

    __slots__ = ("items", "start", "dirty", "alive", "head_live")

    def __init__(self) -> None:
        self.items: list[_Item] = []
        self.start = 0
        self.dirty = False
        self.alive = 0
        self.head_live = False


def _insert_sorted(group: _Group, item: _Item) -> None:
    """Insert ``item`` into the sorted ``group`` at its place (a new head is live)."""
    items = group.items
    at = bisect.bisect_right(items, item, group.start)
    items.insert(at, item)
    if at == group.start:
        group.head_live = True


def _first_after(items: list[_Item], lo: int, idle: float, value: float, seq: int) -> int:
    """The first position from ``lo`` whose entry ranks after ``(value, seq)`` at ``idle``,
    where an entry's rank is ``(cost / idle, seq)``.

    A group is sorted by (cost, seq), so by that rank too: dividing by one idle time keeps
    distinct costs distinct and in order (``exact``). The bisection runs over costs against
    ``value * idle``, which may round either way; the few entries around that guess are then
    ranked exactly."""
    at = bisect.bisect_left(items, (value * idle,), lo)
    while at > lo and (items[at - 1][0] / idle, items[at - 1][1]) > (value, seq):
        at -= 1
    end = len(items)
    while at < end and (items[at][0] / idle, items[at][1]) < (value, seq):
        at += 1
    return at


class EvictionIndex(Generic[E]):
    def __init__(self, policy: EvictionPolicy) -> None:
        if not supports(policy):
            raise ValueError(f"no eviction index for {type(policy).__name__}")
        self.policy = policy
        self._table: _CostTable | None = None
        if isinstance(policy, CostAwareEviction):
            table = _TABLES.get(policy)
            if table is None:
                table = _TABLES[policy] = _CostTable(policy)
            self._table = table
        self._live: dict[E, _Item] = {}
        self._groups: dict[float, _Group] = {}
        # The groups' last-access times, ascending: ``choose`` visits groups oldest first and
        # stops once no group left could rank before what it takes.
        self._order: list[float] = []
        # Entries not yet known to be unpinned: (pin_until, tiebreak, item).
        self._pins: list[tuple[float, int, _Item]] = []
        self._tiebreak = itertools.count()
        # Entries with pin_until <= this are grouped (a clock before it regroups everything).
        self._watermark = 0.0

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, entry: object) -> bool:
        return entry in self._live

    @property
    def exact(self) -> bool:
        return self._table is None or self._table.separated

    def seq_of(self, entry: E) -> int:
        return self._live[entry][1]

    # ------------------------------------------------------------------ membership
    def add(self, entry: E, seq: int) -> None:
        """``entry`` became a candidate; ``seq`` orders it among the others (queue order)."""
        self.add_many((entry,), (seq,))

    def add_many(self, entries: Iterable[E], seqs: Iterable[int]) -> None:
        """``entries`` became candidates, with their ``seqs`` (increasing in queue order)."""
        table = self._table
        by_tokens = table.by_tokens if table is not None else None
        live, groups, watermark = self._live, self._groups, self._watermark
        last_access: float | None = None
        group = _Group()
        for entry, seq in zip(entries, seqs, strict=True):
            if by_tokens is None:
                cost = 0.0
            else:
                tokens = entry.position + entry.num_tokens
                cost = by_tokens.get(tokens)  # type: ignore[assignment]
                if cost is None:
                    cost = table(tokens)  # type: ignore[misc]
            accessed = entry.last_access
            pin_until = entry.pin_until
            item = (cost, seq, entry, accessed, pin_until)
            live[entry] = item
            if pin_until > watermark:
                self._pin(item)
                continue
            if accessed != last_access:  # a batch usually shares one last-access time
                last_access = accessed
                found = groups.get(accessed)
                if found is None:
                    found = self._new_group(accessed)
                group = found
            items = group.items
            if group.dirty or items[-1] < item:
                items.append(item)
            else:
                _insert_sorted(group, item)
            group.alive += 1

    def remove(self, entry: E) -> None:
        self.remove_many((entry,))

    def remove_many(self, entries: Iterable[E]) -> None:
        """``entries`` are no longer candidates (those that were not are ignored)."""
        live, groups, watermark = self._live, self._groups, self._watermark
        for entry in entries:
            item = live.pop(entry, None)
            if item is None or item[4] > watermark:
                continue  # not a candidate, or left in the pin heap (dropped there lazily)
            group = groups[item[3]]
            group.alive -= 1
            if not group.alive:
                del groups[item[3]]
                order = self._order
                del order[bisect.bisect_left(order, item[3])]
            elif len(group.items) - group.start > 2 * group.alive + 16:
                group.dirty = True  # mostly removed entries: rebuilt at the next ``choose``
            elif group.head_live and group.items[group.start] is item:
                group.head_live = False
        # Removed entries are skipped where they still sit in a group's list.

    def update(self, entry: E) -> None:
        """``entry``'s ranking fields changed (a pin) while it is a candidate."""
        item = self._live.get(entry)
        if item is not None:
            self.remove_many((entry,))
            self.add_many((entry,), (item[1],))

    def _new_group(self, last_access: float) -> _Group:
        group = self._groups[last_access] = _Group()
        group.dirty = True
        bisect.insort(self._order, last_access)
        return group

    def _group(self, item: _Item) -> None:
        group = self._groups.get(item[3])
        if group is None:
            group = self._new_group(item[3])
        if group.dirty or group.items[-1] < item:
            group.items.append(item)
        else:
            _insert_sorted(group, item)
        group.alive += 1

    def _pin(self, item: _Item) -> None:
        pins = self._pins
        heapq.heappush(pins, (item[4], next(self._tiebreak), item))
        if len(pins) > 2 * len(self._live) + 1024:  # drop removed entries' leftovers
            live = self._live
            self._pins = [p for p in pins if live.get(p[2][2]) is p[2]]
            heapq.heapify(self._pins)

    # ------------------------------------------------------------------ time
    def _advance(self, now: float) -> None:
        """Group every entry whose pin has expired by ``now``."""
        if now < self._watermark:  # a clock that went back: place everything again
            items = list(self._live.values())
            self._groups.clear()
            self._order.clear()
            self._pins.clear()
            self._watermark = now
            for item in items:
                if item[4] <= now:
                    self._group(item)
                else:
                    self._pin(item)
            return
        self._watermark = now
        pins, live = self._pins, self._live
        while pins and pins[0][0] <= now:
            item = heapq.heappop(pins)[2]
            if live.get(item[2]) is item:
                self._group(item)

    def count_pinned(self, now: float, until: float) -> int:
        """Candidates pinned at ``now`` until no later than ``until`` (``now < pin_until <=
        until``), counted over the pinned entries only (they are capped; candidates are not)."""
        self._advance(now)
        live = self._live
        return sum(1 for p in self._pins if p[0] <= until and live.get(p[2][2]) is p[2])

    # ------------------------------------------------------------------ choosing
    def choose(self, n: int) -> list[E] | None:
        """What ``policy.choose(candidates in queue order, n)`` returns, or None when only the
        policy's scan can answer exactly."""
        if not self.exact:
            return None
        if n <= 0:
            return []
        now = self.policy.clock()
        self._advance(now)
        cost_aware = self._table is not None
        # The cheapest cost any entry has (the table only grows): no entry of a group ranks
        # before ``floor / idle`` (cost-aware) or its last access (LRU), a bound that grows
        # with the last access, so groups join the merge oldest first, only while they could
        # rank before the best head so far.
        floor = self._table.distinct[0] if cost_aware and self._table.distinct else 0.0  # type: ignore[union-attr]
        order, groups = self._order, self._groups
        nxt, end, bound = 0, len(order), 0.0
        # Each joined group's head: (value, seq, position, items, idle); the group's entries
        # rank by (cost / idle, seq) for the cost-aware policy and (last access, seq) for LRU.
        heads: list[tuple[float, int, int, list[_Item], float]] = []
        out: list[E] = []
        while len(out) < n:
            while nxt < end:
                last_access = order[nxt]
                if cost_aware:
                    idle = now - last_access
                    if idle <= _IDLE_FLOOR:
                        idle = _IDLE_FLOOR
                    bound = floor / idle
                else:
                    idle, bound = 0.0, last_access
                if heads and bound > heads[0][0]:
                    break
                i, items = self._head(groups[last_access])
                value = items[i][0] / idle if cost_aware else last_access
                heapq.heappush(heads, (value, items[i][1], i, items, idle))
                nxt += 1
            if not heads:
                break
            _, _, i, items, idle = heads[0]
            # The best head of the other groups: the smaller child of the heap's root, or the
            # groups not joined yet, whose entries rank from (bound, -1) on. The root's group
            # goes on giving entries while they rank before it.
            k = len(heads)
            other = None if k == 1 else heads[1] if k == 2 or heads[1] < heads[2] else heads[2]
            if nxt < end and (other is None or (bound, -1) < other[:2]):
                other = (bound, -1)  # type: ignore[assignment]
            i = self._take_run(items, i, idle if cost_aware else None, other, n, out)
            if len(out) == n:
                break
            if i == len(items):
                heapq.heappop(heads)
                continue
            value = items[i][0] / idle if cost_aware else heads[0][0]
            heapq.heapreplace(heads, (value, items[i][1], i, items, idle))
        if len(out) < n:
            out.extend(self._pinned(now, n - len(out)))
        return out

    def _head(self, group: _Group) -> tuple[int, list[_Item]]:
        """The position of ``group``'s first live entry, and its item list (sorted here if it
        was left unsorted)."""
        items = group.items
        if group.head_live and not group.dirty:
            return group.start, items
        live = self._live
        if group.dirty:
            start = group.start
            items = group.items = sorted([it for it in items[start:] if live.get(it[2]) is it])
            group.start = 0
            group.dirty = False
        i = group.start
        while live.get(items[i][2]) is not items[i]:
            i += 1
        group.start = i
        group.head_live = True
        return i, items

    def _take_run(
        self,
        items: list[_Item],
        i: int,
        idle: float | None,
        other: tuple[float, int] | tuple[float, int, int, list[_Item], float] | None,
        n: int,
        out: list[E],
    ) -> int:
        """Append to ``out``, until it holds ``n``, the live entries of one group's ``items``
        from ``i`` on that rank before ``other`` (a (value, seq) pair first; None: every entry);
        ``idle`` is the group's idle time under the cost-aware policy, None under LRU (a group's
        entries then all rank before another group's). Returns the position of the first live
        entry not taken, or ``len(items)``; once ``out`` is full, where the caller stopped.

        Runs are short under the cost-aware policy (the cheap leading chunks of many groups
        interleave, a chunk or two each), so the first entries are ranked one by one before
        bisecting the rest of the group."""
        live = self._live
        end = len(items)
        bounded = idle is not None and other is not None
        limit_value, limit_seq = (other[0], other[1]) if bounded else (0.0, 0)  # type: ignore[index]
        j, linear = i, i + 8
        while j < end and j < linear:
            it = items[j]
            if live.get(it[2]) is it:
                if len(out) == n or (bounded and (it[0] / idle, it[1]) > (limit_value, limit_seq)):  # type: ignore[operator]
                    return j
                out.append(it[2])
            j += 1
        if j == end or len(out) == n:
            return j
        stop = _first_after(items, j, idle, limit_value, limit_seq) if bounded else end  # type: ignore[arg-type]
        j = self._take(items, j, stop, n, out)
        if len(out) == n:
            return j
        while j < end and live.get(items[j][2]) is not items[j]:
            j += 1
        return j

    def _take(self, items: list[_Item], i: int, stop: int, n: int, out: list[E]) -> int:
        """Append the live entries of ``items[i:stop]`` to ``out`` until it holds ``n``;
        returns the position after the last one looked at."""
        live = self._live
        while i < stop:
            need = n - len(out)
            end = min(stop, i + need + (need >> 1) + 8)  # a window: most entries are live
            taken = [it[2] for it in items[i:end] if live.get(it[2]) is it]
            if len(taken) < need:
                out.extend(taken)
                i = end
                continue
            if len(taken) > need:
                taken = taken[:need]
            out.extend(taken)
            # Past the last entry taken (the caller stops now: ``out`` is full).
            return end
        return i

    def _pinned(self, now: float, n: int) -> list[E]:
        """The first ``n`` candidates still pinned at ``now``, in the policy's order.

        Both policies rank by ``(pinned, -pin_until, value)``, then queue order. The first two
        need no cost model, so the entries are put in that order first and the value is
        computed only within the pin times that ``n`` reaches (a request's blocks share one pin
        time): under pressure from pins this ran the policy's value over every pinned entry
        on each eviction."""
        policy, live = self.policy, self._live
        ranked = []
        for _, _, item in self._pins:
            entry = item[2]
            if live.get(entry) is item:
                pinned = entry.pin_until > now
                ranked.append((pinned, -entry.pin_until if pinned else 0.0, item[1], entry))
        ranked.sort(key=lambda t: (t[0], t[1]))
        out: list[E] = []
        i, end = 0, len(ranked)
        while i < end and len(out) < n:
            j = i + 1
            while j < end and ranked[j][:2] == ranked[i][:2]:
                j += 1
            tied = sorted(
                ((policy.key(t[3], now)[2], t[2], t[3]) for t in ranked[i:j]),
                key=lambda t: (t[0], t[1]),
            )
            out.extend(entry for _, _, entry in tied[: n - len(out)])
            i = j
        return out
