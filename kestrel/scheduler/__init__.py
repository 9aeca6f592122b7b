"""Scheduling: which requests run how many tokens in the next engine step."""
from kestrel.scheduler.scheduler import ScheduledRequest, Scheduler, SchedulerOutput

__all__ = ["ScheduledRequest", "Scheduler", "SchedulerOutput"]
