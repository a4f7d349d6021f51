"""Asynchronous video jobs, persisted as one JSON file (and one MP4) per job.

A finished video survives a server restart; a job that was still queued or running when the server
stopped is reported as failed after the restart, never as silently lost.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field


@dataclass
class VideoJob:
    id: str
    prompt: str
    model: str
    size: str
    seconds: str
    num_frames: int | None = None
    fps: int | None = None
    status: str = "queued"  # queued | in_progress | completed | failed
    progress: int = 0
    created_at: int = field(default_factory=lambda: int(time.time()))
    completed_at: int | None = None
    error: dict | None = None
    seed: int | None = None

    def to_api(self) -> dict:
        return {
            "id": self.id,
            "object": "video",
            "model": self.model,
            "status": self.status,
            "progress": self.progress,
            "created_at": self.created_at,
            "completed_at": self.completed_at,
            "expires_at": None,
            "prompt": self.prompt,
            "size": self.size,
            "seconds": self.seconds,
            "remixed_from_video_id": None,
            "error": self.error,
            "seed": self.seed,
        }


class VideoJobStore:
    """Jobs in memory and on disk. The folder is made when the first job is written; an MP4 is
    written to a `.part` file and renamed when complete, so a deleted or failed job leaves nothing."""

    def __init__(self, root: str, ttl_s: float | None = None):
        self.root = root
        self.ttl_s = ttl_s
        self._jobs: dict[str, VideoJob] = {}
        self._lock = threading.Lock()
        if os.path.isdir(root):
            self._load()

    def _json_path(self, job_id: str) -> str:
        return os.path.join(self.root, f"{job_id}.json")

    def content_path(self, job_id: str) -> str:
        return os.path.join(self.root, f"{job_id}.mp4")

    def partial_path(self, job_id: str) -> str:
        return self.content_path(job_id) + ".part"

    def publish(self, job_id: str) -> bool:
        """Move a finished MP4 into place; False (and the partial file removed) if the job was deleted."""
        with self._lock:
            if job_id in self._jobs:
                os.replace(self.partial_path(job_id), self.content_path(job_id))
                return True
        self.discard_partial(job_id)
        return False

    def discard_partial(self, job_id: str) -> None:
        try:
            os.remove(self.partial_path(job_id))
        except FileNotFoundError:
            pass

    def stored_bytes(self) -> int:
        """Bytes of finished videos kept."""
        return sum(os.path.getsize(p) for p in map(self.content_path, list(self._jobs)) if os.path.exists(p))

    def expire(self) -> int:
        """Delete finished jobs older than the TTL (record and video); how many went."""
        if self.ttl_s is None:
            return 0
        cutoff = time.time() - self.ttl_s
        old = [j.id for j in list(self._jobs.values())
               if j.status in ("completed", "failed") and (j.completed_at or j.created_at) < cutoff]
        for job_id in old:
            self.delete(job_id)
        return len(old)

    def _load(self) -> None:
        for name in sorted(os.listdir(self.root)):
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(self.root, name)) as f:
                    job = VideoJob(**json.load(f))
            except (OSError, ValueError, TypeError):
                continue  # a damaged record is skipped, not fatal
            if job.status in ("queued", "in_progress"):
                self.discard_partial(job.id)
                job.status = "failed"
                job.error = {"code": "server_restarted", "message": "the server restarted before the job finished"}
                self._persist(job)
            self._jobs[job.id] = job

    def _persist(self, job: VideoJob) -> None:
        os.makedirs(self.root, exist_ok=True)
        tmp = self._json_path(job.id) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(job), f)
        os.replace(tmp, self._json_path(job.id))

    def create(self, **fields) -> VideoJob:
        job = VideoJob(id=f"video_{uuid.uuid4().hex}", **fields)
        with self._lock:
            self._jobs[job.id] = job
            self._persist(job)
        return job

    def update(self, job_id: str, **fields) -> VideoJob | None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:  # deleted meanwhile
                return None
            for key, value in fields.items():
                setattr(job, key, value)
            self._persist(job)
            return job

    def get(self, job_id: str) -> VideoJob | None:
        return self._jobs.get(job_id)

    def list(self, limit: int = 20, after: str | None = None, order: str = "desc") -> tuple[list[VideoJob], bool]:
        jobs = sorted(self._jobs.values(), key=lambda j: (j.created_at, j.id), reverse=(order == "desc"))
        if after is not None:
            ids = [j.id for j in jobs]
            jobs = jobs[ids.index(after) + 1 :] if after in ids else []
        return jobs[:limit], len(jobs) > limit

    def delete(self, job_id: str) -> bool:
        with self._lock:
            job = self._jobs.pop(job_id, None)
            for path in (self._json_path(job_id), self.content_path(job_id), self.partial_path(job_id)):
                if os.path.exists(path):
                    os.remove(path)
        return job is not None
