"""Drive a rollout cluster from Python: submit jobs, follow their results, cancel them,
read the cluster's status. See rollout_client.client for the API."""

from .client import (
    Client,
    ClusterStatus,
    InvalidArgument,
    Job,
    JobStatus,
    NotFound,
    Result,
    RolloutError,
    Task,
    Unavailable,
    WorkerStatus,
)

__all__ = [
    "Client",
    "ClusterStatus",
    "InvalidArgument",
    "Job",
    "JobStatus",
    "NotFound",
    "Result",
    "RolloutError",
    "Task",
    "Unavailable",
    "WorkerStatus",
]
