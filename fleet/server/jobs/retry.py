"""A source group's retry policy: a failed backup is queued again after the
group's delay, up to its number of retries. The new job's due time is a
column (not_before) that the ticker wakes for."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any, Optional

from ..store.models import Job, SourceGroup

log = logging.getLogger("fleetd.jobs")

MAX_DELAY = 7 * 24 * 3600  # a retry delay never overflows a date, whatever the row says


def after_failure(
    job: Job, now: dt.datetime
) -> Optional[tuple[SourceGroup, dict[str, Any], dt.datetime]]:
    """(group, params, due time) of the retry of a failed job, or None."""
    if job.kind not in ("backup", "copy") or job.group_id is None:
        return None
    group = SourceGroup.get_or_none(SourceGroup.id == job.group_id)
    attempt = int((job.params or {}).get("attempt", 1))
    if group is None or attempt > group.retries:
        return None
    delay = max(0, min(int(group.retry_delay), MAX_DELAY))
    params = {k: v for k, v in (job.params or {}).items() if k != "not_before"}
    params["attempt"] = attempt + 1
    log.info("job %s failed; retry %d of %d in %d s", job.id, attempt, group.retries, delay)
    return group, params, now + dt.timedelta(seconds=delay)
