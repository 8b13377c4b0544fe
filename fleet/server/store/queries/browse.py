"""The cache of snapshot directory listings (api/snapshots.py fills it).

A listing is filled page by page while its agent answers (`entries` is -1
until it is whole); only whole ones are read. Past MAX_ENTRIES entries in
all, the least recently used listings go, and with them those of
snapshots fleetd no longer lists (forgotten, or their repository gone).
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Optional

from peewee import fn

from ..models import Listing, ListingPage, Snapshot

PAGE = 500  # entries in each stored page (protocol.QUERY_PAGE)
MAX_ENTRIES = 2_000_000  # entries kept in all


def page(
    repository_id: int, snapshot_id: str, path: str, offset: int, limit: int
) -> Optional[dict[str, Any]]:
    """Entries offset..offset+limit of a whole listing, or None when there
    is none."""
    listing = Listing.get_or_none(
        (Listing.repository == repository_id)
        & Listing.snapshot_id.in_(ids(snapshot_id))
        & (Listing.path == path)
        & (Listing.entries >= 0)
    )
    if listing is None:
        return None
    first, last = offset // PAGE, (offset + limit - 1) // PAGE
    rows = (
        ListingPage.select(ListingPage.page, ListingPage.items)
        .where(
            (ListingPage.listing == listing)
            & (ListingPage.page >= first)
            & (ListingPage.page <= last)
        )
        .order_by(ListingPage.page)
    )
    entries = [item for row in rows for item in row.items]
    start = offset - first * PAGE
    return {
        "listing": listing.id,
        "entries": entries[start : start + limit],
        "total": listing.entries,
        "node": listing.node,
    }


def ids(snapshot_id: str) -> tuple[str, ...]:
    """The names a listing of this snapshot may be kept under: restic 0.14
    first reports a new snapshot by its short id (8 digits), then the full."""
    return (snapshot_id, snapshot_id[:8])


FILLING = dt.timedelta(minutes=10)  # a listing filled for longer was abandoned


def start(repository_id: int, snapshot_id: str, path: str, now: dt.datetime) -> Optional[int]:
    """A new listing being filled (one there was, whole or abandoned, goes);
    None while another caller is filling it."""
    filling = Listing.get_or_none(
        (Listing.repository == repository_id)
        & Listing.snapshot_id.in_(ids(snapshot_id))
        & (Listing.path == path)
        & (Listing.entries < 0)
        & (Listing.created_at > now - FILLING)
    )
    if filling is not None:
        return None
    Listing.delete().where(
        (Listing.repository == repository_id)
        & Listing.snapshot_id.in_(ids(snapshot_id))
        & (Listing.path == path)
    ).execute()
    return Listing.insert(
        repository=repository_id,
        snapshot_id=snapshot_id,
        path=path,
        entries=-1,
        created_at=now,
        used_at=now,
    ).execute()


def add_page(listing_id: int, number: int, items: list[dict[str, Any]]) -> None:
    """One page; nothing when the listing was dropped meanwhile."""
    if Listing.get_or_none(Listing.id == listing_id) is not None:
        ListingPage.insert(listing=listing_id, page=number, items=items).execute()


def finish(listing_id: int, total: int, node: Optional[dict], now: dt.datetime) -> None:
    Listing.update(entries=total, node=node, used_at=now).where(Listing.id == listing_id).execute()
    prune(MAX_ENTRIES, keep=listing_id)


def drop(listing_id: int) -> None:
    Listing.delete().where(Listing.id == listing_id).execute()


def touch(listing_id: int, now: dt.datetime) -> None:
    Listing.update(used_at=now).where(Listing.id == listing_id).execute()


def prune(max_entries: int, keep: int = 0) -> int:
    """Listings of snapshots fleetd no longer lists, then the least
    recently used past max_entries (but not `keep`); how many went.

    A snapshot a backup just made is first known by restic 0.14's short id,
    then by its full one: a listing under the short id is not an orphan."""
    gone = (
        Listing.delete()
        .where(
            (Listing.id != keep)
            & ~fn.EXISTS(
                Snapshot.select(Snapshot.id).where(
                    (Snapshot.repository == Listing.repository)
                    & (
                        fn.substr(Snapshot.snapshot_id, 1, fn.length(Listing.snapshot_id))
                        == Listing.snapshot_id
                    )
                )
            )
        )
        .execute()
    )
    total = Listing.select(fn.COALESCE(fn.SUM(Listing.entries), 0)).scalar()
    if total <= max_entries:
        return gone
    for listing_id, entries in (
        Listing.select(Listing.id, Listing.entries)
        .where(Listing.id != keep)
        .order_by(Listing.used_at)
        .tuples()
    ):
        if total <= max_entries:
            break
        Listing.delete().where(Listing.id == listing_id).execute()
        total -= max(entries, 0)
        gone += 1
    return gone
