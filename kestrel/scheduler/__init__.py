"""Scheduling: which requests run how many tokens in the next engine step, and the step batch."""
from kestrel.scheduler.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from kestrel.scheduler.step_builder import build_step_batch

__all__ = ["ScheduledRequest", "Scheduler", "SchedulerOutput", "build_step_batch"]
